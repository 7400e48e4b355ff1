"""kill -9 of the prefork children of a real ``celery -A proj worker``: jobs cut
off run again and take effect once, none is lost, and a job that kills its
worker every time stops at its maximum attempts instead of looping."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from celery import Celery
from e2e_tasks import (
    create_effects_table,
    effect_counts,
    jobs,
    kill_own_worker,
    overtime,
    record_effect,
    states,
)
from subprocesses import Command, Commands

from proj.db import session_scope, worker_engine
from proj.jobs import ledger
from proj.jobs.models import State

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

JOBS = 100
KILLS = 10
SECONDS = 0.2
"""How long each job takes (long enough to be caught running)."""


@pytest.fixture(scope="module")
def worker(stack: Stack, celery_app: Celery, tmp_path_factory: Any) -> Iterator[Command]:
    """One prefork worker (two children) on the stack, for the module."""
    celery_app.control.purge()
    create_effects_table(worker_engine())
    running = Commands(tmp_path_factory.mktemp("lost-workers"))
    try:
        yield running.worker(stack.process_env())
    finally:
        running.stop_all()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def children(worker: Command) -> set[int]:
    """The pids of ``worker``'s living children (a killed one stays a zombie
    until the pool notices)."""
    alive = set()
    for child in worker.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
    return alive


def enqueue(run: str, count: int) -> list[str]:
    with session_scope() as session:
        return [
            record_effect.apply_async_on_commit((run, n, SECONDS), session=session)
            for n in range(count)
        ]


def running_first_attempt(
    worker: Command, job_ids: list[str], killed: set[int]
) -> tuple[int, str] | None:
    """A child of ``worker`` (not killed yet) and the job it is running, on
    that job's first attempt."""
    alive = children(worker) - killed
    for job in jobs(job_ids):
        pid = int((job.worker or ":0").rpartition(":")[2])
        if job.state == State.RUNNING and job.attempts == 1 and pid in alive:
            return pid, job.id
    return None


def test_children_forked_during_a_write_can_write(
    stack: Stack, celery_app: Celery, commands: Commands
) -> None:
    """The worker's main process is writing the SQLite database (a thread holds
    a write transaction for 3 s) as the pool forks its children: the forks
    wait for the write to end, and the children then claim and run jobs. (A
    child forked during the write could never write the file: every claim
    would fail with "database is locked".)"""
    if not stack.settings.embedded:
        pytest.skip("a PostgreSQL server's locks are not kept in the worker's processes")
    create_effects_table(worker_engine())
    worker = commands.worker(stack.process_env(E2E_WRITE_AT_START="3"))
    worker.wait_for_output("e2e: write ended")
    ended = re.search(r"e2e: write ended at ([\d.]+)", worker.output())
    assert ended is not None, worker.output()
    began = [float(at) for at in re.findall(r"e2e: child began at ([\d.]+)", worker.output())]
    assert len(began) == 2
    assert min(began) > float(ended[1]), "a child was forked during the write"
    run = tag()
    job_ids = enqueue(run, 4)
    worker.until(lambda: states(job_ids) == Counter({State.SUCCEEDED: 4}), timeout=60)
    assert effect_counts(run) == Counter(dict.fromkeys(range(4), 1))


def test_killed_children_lose_nothing_and_repeat_nothing(
    celery_app: Celery, worker: Command
) -> None:
    """100 jobs committed with ``delay_on_commit``; while they run, ten times
    a child running one is killed with SIGKILL. Every job ends ``succeeded``
    and took effect exactly once; the jobs cut off ran again."""
    since = worker.size()
    run = tag()
    job_ids = enqueue(run, JOBS)
    killed: set[int] = set()
    while len(killed) < KILLS:
        pid, _ = worker.until(lambda: running_first_attempt(worker, job_ids, killed), timeout=60)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)

    worker.until(lambda: states(job_ids) == Counter({State.SUCCEEDED: JOBS}), timeout=120)
    assert effect_counts(run) == Counter(dict.fromkeys(range(JOBS), 1))
    attempts = {job.id: job.attempts for job in jobs(job_ids)}
    assert sum(attempts.values()) > JOBS, "no job was cut off by a kill"
    assert worker.output(since).count("exited with 'signal 9 (SIGKILL)'") == KILLS
    assert worker.popen.poll() is None


def test_a_job_that_kills_its_worker_stops_at_its_maximum(
    celery_app: Celery, worker: Command
) -> None:
    """A job whose task kills the child running it every time (and names no
    retry policy, so it gets ``PROJ_MAX_ATTEMPTS``, 3) is delivered three
    times and ends ``failed``, its error naming the lost worker; the worker
    meanwhile keeps serving other jobs."""
    since = worker.size()
    job_id = kill_own_worker.delay_on_commit()
    run = tag()
    others = enqueue(run, 6)
    worker.until(lambda: states([job_id]) == Counter({State.FAILED: 1}), timeout=90)
    worker.until(lambda: states(others) == Counter({State.SUCCEEDED: 6}), timeout=60)
    [job] = jobs([job_id])
    assert (job.attempts, job.max_attempts) == (3, 3)
    assert job.error is not None and "the worker running it was lost" in job.error
    assert "WorkerLostError" in job.error
    assert effect_counts(run) == Counter(dict.fromkeys(range(6), 1))
    # After the third, the message is dropped: the job is not delivered again.
    after = enqueue(tag(), 4)
    worker.until(lambda: states(after) == Counter({State.SUCCEEDED: 4}), timeout=60)
    log = worker.output(since)
    assert log.count(f"e2e.kill_own_worker[{job_id}] received") == 3
    assert log.count("exited with 'signal 9 (SIGKILL)'") == 3
    assert worker.popen.poll() is None


def test_a_job_past_its_hard_time_limit_ends_its_attempt_at_once(
    celery_app: Celery, worker: Command
) -> None:
    """A job whose task overruns its hard time limit (1 s) every time, with
    ``max_attempts=2``: each overrun ends the attempt at once (``retrying``,
    published again; not ``running`` until the reconciler's 300 s), and the
    second ends the job ``failed``, each attempt's error kept."""
    job_id = overtime.delay_on_commit()
    worker.until(lambda: states([job_id]) == Counter({State.FAILED: 1}), timeout=60)
    [job] = jobs([job_id])
    assert (job.attempts, job.max_attempts) == (2, 2)
    with session_scope() as session:
        errors = [(a.attempt, a.outcome, a.error) for a in ledger.attempts_of(session, job_id)]
    assert errors == [
        (1, "retrying", "hard time limit (1 s) exceeded"),
        (2, "failed", "hard time limit (1 s) exceeded"),
    ]
    assert worker.popen.poll() is None


def test_a_plain_delay_that_kills_its_worker_stops_at_its_maximum(
    celery_app: Celery, worker: Command
) -> None:
    """The same task sent with plain ``.delay()`` (no ledger row to count its
    deliveries): proj counts the lost attempts itself, so it is delivered three
    times (``PROJ_MAX_ATTEMPTS``) and then ends as a ``failed`` row, instead of
    going back to the queue forever."""
    since = worker.size()
    task_id = kill_own_worker.delay().id
    worker.until(lambda: states([task_id]) == Counter({State.FAILED: 1}), timeout=90)
    [job] = jobs([task_id])
    assert job.attempts == 3 and "the worker running it was lost" in (job.error or "")
    with session_scope() as session:
        outcomes = [a.outcome for a in ledger.attempts_of(session, task_id)]
    assert outcomes == ["retrying", "retrying", "failed"]
    after = enqueue(tag(), 4)
    worker.until(lambda: states(after) == Counter({State.SUCCEEDED: 4}), timeout=60)
    assert worker.output(since).count(f"e2e.kill_own_worker[{task_id}] received") == 3
