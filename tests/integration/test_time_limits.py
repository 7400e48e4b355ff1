"""Hard time limits on Celery's threads pool (``proj run``'s), which
enforces none itself: at a run's limit its attempt ends, as on prefork
(``retrying``, then ``failed`` on the last), and the run is interrupted,
its transaction rolled back and its thread free for the next; a run stuck
in a call it cannot be interrupted in has its attempt ended all the same,
and its commit refused when the call returns. On the embedded stack, where
the threads pool is the default."""

from __future__ import annotations

import time

import pytest
from celery import Celery
from celery.worker import state as worker_state
from sqlalchemy import select

import proj.jobs.testing
from proj.db import Session, session_scope
from proj.jobs import SqlAlchemyTask, shared_task, time_limits
from proj.jobs.ledger import attempts_of
from proj.jobs.models import State
from proj.models import User

LIMIT = 1


@shared_task(
    name="tests.time_limits.spin", bind=True, ignore_result=True, time_limit=LIMIT, max_attempts=2
)
def spin(self: SqlAlchemyTask, email: str) -> None:
    Session.add(User(email=email))
    while True:  # Python code: interrupted at its limit
        time.sleep(0.01)


@shared_task(
    name="tests.time_limits.block", bind=True, ignore_result=True, time_limit=LIMIT, max_attempts=1
)
def block(self: SqlAlchemyTask, email: str) -> None:
    Session.add(User(email=email))
    time.sleep(LIMIT + time_limits.GRACE + 1.5)  # one C call, past limit and grace


@shared_task(name="tests.time_limits.quick", ignore_result=True)
def quick() -> str:
    return "done"


@pytest.fixture
def embedded(purged: Celery, stack: object) -> Celery:
    if getattr(stack, "on_postgres", True):
        pytest.skip("the embedded stack runs the threads pool; the others prefork")
    return purged


def users(email: str) -> int:
    with session_scope() as session:
        return len(session.scalars(select(User).where(User.email == email)).all())


def test_a_run_past_its_limit_is_interrupted_and_its_thread_freed(embedded: Celery) -> None:
    with session_scope() as session:
        spun = spin.apply_async_on_commit(("spin@example.com",), session=session)
        after = quick.apply_async_on_commit(session=session)
    with proj.jobs.testing.worker(embedded, pool="threads", concurrency=1):
        failed = proj.jobs.testing.wait_for_state(spun, State.FAILED, timeout=30)
        # One thread: the job after it ran, so the thread was freed.
        proj.jobs.testing.wait_for_state(after, State.SUCCEEDED, timeout=30)
    assert failed.error == f"hard time limit ({LIMIT} s) exceeded"
    assert failed.attempts == 2, "retried once, then failed, as on prefork"
    with session_scope() as session:
        outcomes = [attempt.outcome for attempt in attempts_of(session, spun)]
    assert outcomes == [State.RETRYING, State.FAILED]
    assert users("spin@example.com") == 0, "its transactions rolled back"


def test_a_run_stuck_in_a_call_has_its_job_failed_and_its_commit_refused(
    embedded: Celery,
) -> None:
    with session_scope() as session:
        stuck = block.apply_async_on_commit(("block@example.com",), session=session)
    with proj.jobs.testing.worker(embedded, pool="threads", concurrency=1):
        failed = proj.jobs.testing.wait_for_state(stuck, State.FAILED, timeout=30)
        assert failed.error == f"hard time limit ({LIMIT} s) exceeded"
        # The call returns, and the run ends (before its stack goes away).
        proj.jobs.testing.wait_for(lambda: not worker_state.active_requests, timeout=30)
    assert users("block@example.com") == 0, "its late commit was refused"
    assert proj.jobs.testing.job(stuck).state == State.FAILED
