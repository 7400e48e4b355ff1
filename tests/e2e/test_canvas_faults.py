"""Canvases on the ledger under real faults, with a real prefork ``celery -A
proj worker``: a chain whose step 2 loses its child to SIGKILL (while it
runs, or the moment its success commits), and a chord of 100 members while
RabbitMQ restarts. Every step takes effect once, each result reaches the
step after it, and a step is released once, however often its parents'
messages come back."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import kombu.pools
import pytest
from celery import Celery, chord
from e2e_tasks import canvas_step, create_effects_table, effects, record_effect
from sqlalchemy import select
from subprocesses import Command, Commands

from proj.db import session_scope, worker_engine
from proj.jobs import enqueue_on_commit, ledger
from proj.jobs.models import Job, State

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

KILLED = "exited with 'signal 9 (SIGKILL)'"
"""What the worker logs when one of its children is killed."""
MEMBERS = 100


def tag() -> str:
    return uuid.uuid4().hex[:10]


def steps(canvas_id: str) -> list[Job]:
    """The canvas's ledger rows (detached), in the order they were written."""
    with session_scope() as session:
        found = list(
            session.scalars(select(Job).where(Job.canvas_id == canvas_id).order_by(Job.id))
        )
        session.expunge_all()
        return found


def states(canvas_id: str) -> Counter[str]:
    return Counter(job.state for job in steps(canvas_id))


def effect_rows(run: str) -> list[tuple[int, str]]:
    """``run``'s effects as ``(n, job id)``, in the order they committed."""
    with session_scope() as session:
        query = select(effects.c.n, effects.c.job_id).where(effects.c.tag == run)
        return [(n, job_id) for n, job_id in session.execute(query.order_by(effects.c.at))]


@pytest.mark.parametrize("die", ["running", "committed"])
def test_a_chain_whose_step_2_loses_its_child_takes_each_effect_once(
    stack: Stack, purged: Celery, commands: Commands, die: str
) -> None:
    """A chain of three; step 2's first attempt kills its child with SIGKILL,
    either while it runs (its effect written, not committed) or the moment
    its success and step 3's release commit (before the fast path publishes
    step 3 and before the broker hears step 2 ran). Each step takes effect
    once, in order; each gets the result of the step before it; step 3 is
    released once. Killed while running, step 2 runs again (attempt 2);
    killed after its commit, its message comes back and is skipped, and the
    relay publishes step 3."""
    create_effects_table(worker_engine())
    worker = commands.worker(stack.process_env())
    run = tag()
    canvas = canvas_step.s([], run, 1) | canvas_step.s(run, 2, die=die) | canvas_step.s(run, 3)
    with session_scope() as session:
        canvas_id = enqueue_on_commit(canvas, session=session)
    worker.until(lambda: states(canvas_id) == Counter({State.SUCCEEDED: 3}), timeout=60)

    first, second, third = sorted(steps(canvas_id), key=lambda job: job.args[2])
    assert effect_rows(run) == [(1, first.id), (2, second.id), (3, third.id)]
    assert (first.args, first.result) == ([[], run, 1], [1])
    assert (second.args, second.kwargs, second.result) == ([[1], run, 2], {"die": die}, [1, 2])
    assert (third.args, third.result) == ([[1, 2], run, 3], [1, 2, 3])
    assert all(job.parents_left == 0 for job in (first, second, third))
    assert third.attempts == 1, "step 3 ran more than once"
    with session_scope() as session:
        lost = [(a.attempt, a.outcome) for a in ledger.attempts_of(session, second.id)]
    if die == "running":
        assert (second.attempts, lost) == (2, [(1, "retrying")])
    else:
        # The pool may take its 5 s maintenance tick to see the child gone,
        # and only then does the broker deliver step 2 again.
        worker.wait_for_output(
            f"e2e.canvas_step[{second.id}]: job is succeeded; skipping", timeout=30
        )
        assert (second.attempts, lost) == (1, [])
        assert f"e2e.canvas_step[{second.id}] succeeded" not in worker.output()
        assert states(canvas_id) == Counter({State.SUCCEEDED: 3})
        assert effect_rows(run) == [(1, first.id), (2, second.id), (3, third.id)]
    assert worker.output().count(KILLED) == 1, "step 2's child was not killed once"
    assert worker.popen.poll() is None


@contextmanager
def rabbitmq_stopped(celery_app: Celery) -> Iterator[None]:
    """RabbitMQ's application stopped for the block (``rabbitmqctl
    stop_app``: every connection cut, durable queues and persistent
    messages kept), then started again and this process's broker
    connections, dead with it, dropped."""
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)
        kombu.pools.reset()
        celery_app.close()
        celery_app.amqp._producer_pool = None  # Celery keeps the closed one otherwise


def members_done(canvas_id: str, callback_id: str) -> int:
    return sum(
        1 for job in steps(canvas_id) if job.id != callback_id and job.state == State.SUCCEEDED
    )


def test_a_chord_of_100_through_a_rabbitmq_restart_calls_back_once_with_every_result(
    stack: Stack, purged: Celery, commands: Commands
) -> None:
    """A chord of 100 members (0.1 s each) committed; while a worker runs
    them, RabbitMQ's application stops for 2 s and starts again. The worker
    reconnects; every member takes effect once, and the callback runs once,
    its first argument the 100 results in the members' order."""
    if stack.name != "pg-rabbit":
        pytest.skip("restarts the machine's RabbitMQ: the pg-rabbit stack's")
    create_effects_table(worker_engine())
    worker: Command = commands.worker(stack.process_env())
    run = tag()
    header = [record_effect.s(run, n, 0.1) for n in range(MEMBERS)]
    with session_scope() as session:
        canvas_id = enqueue_on_commit(chord(header, canvas_step.s(run, MEMBERS)), session=session)
    [callback_id] = [job.id for job in steps(canvas_id) if job.name == canvas_step.name]

    worker.until(lambda: members_done(canvas_id, callback_id) >= 10, timeout=60)
    with rabbitmq_stopped(purged):
        cut_off = members_done(canvas_id, callback_id)
        time.sleep(2)
    assert cut_off < MEMBERS, "the members were done before the restart"
    worker.until(lambda: states(canvas_id) == Counter({State.SUCCEEDED: MEMBERS + 1}), timeout=75)

    every: list[Any] = list(range(MEMBERS))
    [callback] = [job for job in steps(canvas_id) if job.id == callback_id]
    assert callback.args == [every, run, MEMBERS]
    assert callback.result == [*every, MEMBERS]
    assert callback.parents_left == 0
    done = Counter(n for n, _ in effect_rows(run))
    assert done == Counter(dict.fromkeys(range(MEMBERS + 1), 1)), "an effect not once"
    assert effect_rows(run)[-1] == (MEMBERS, callback_id), "the callback ran before a member"
    assert worker.output().count("Connection to broker lost") >= 1, "the worker never saw it"
    assert worker.popen.poll() is None
