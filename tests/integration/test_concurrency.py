"""Concurrency limits per key, on every stack: 300 jobs over 3 keys with a
limit of 2, all in the broker at once and run by 6 threads that claim at
once, never have a third job of a key running (measured from the runs' own
times); all 300 run once, with no attempt counted for the deliveries handed
back to the ledger."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from celery import Celery
from sqlalchemy import func, select

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import SqlAlchemyTask, TaskArgumentError, shared_task
from proj.jobs.models import Job, State

RUNS: list[tuple[str, float, float]] = []
"""Each run of ``hold``: its key, and when it started and ended."""
_lock = threading.Lock()


@shared_task(
    name="tests.concurrency.hold", bind=True, ignore_result=True, concurrency=("merchant:{0}", 2)
)
def hold(self: SqlAlchemyTask, merchant: str) -> None:
    started = time.monotonic()
    time.sleep(0.02)
    with _lock:
        RUNS.append((merchant, started, time.monotonic()))


@shared_task(name="tests.concurrency.named", ignore_result=True, concurrency=("{merchant}", 1))
def named(merchant: str) -> None:
    """A key from a keyword argument."""


def most_at_once(runs: list[tuple[float, float]]) -> int:
    """The most of ``runs`` (start, end) under way at one moment."""
    moments = sorted([(start, 1) for start, _ in runs] + [(end, -1) for _, end in runs])
    busy = most = 0
    for _, step in moments:
        busy += step
        most = max(most, busy)
    return most


def test_no_key_ever_runs_more_than_its_limit(purged: Celery) -> None:
    merchants = [f"m{n}" for n in range(3)]
    RUNS.clear()
    with session_scope() as session:
        # All at once in the broker (the fast path): only the claims hold the limit.
        job_ids = [
            hold.apply_async_on_commit((m,), session=session) for m in merchants for _ in range(100)
        ]
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=6):
        proj.jobs.testing.wait_for(lambda: len(RUNS) >= 300, timeout=120)
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for merchant, started, ended in RUNS:
        by_key[merchant].append((started, ended))
    assert sorted(by_key) == merchants
    assert all(len(runs) == 100 for runs in by_key.values()), "each job ran once"
    assert {most_at_once(runs) for runs in by_key.values()} == {2}
    with session_scope() as session:
        done = session.execute(
            select(Job.state, Job.attempts, func.count())
            .where(Job.id.in_(job_ids))
            .group_by(Job.state, Job.attempts)
        ).all()
        keys = set(session.scalars(select(Job.concurrency_key).where(Job.id.in_(job_ids))))
    assert [tuple(row) for row in done] == [(State.SUCCEEDED, 1, 300)]
    assert keys == {f"merchant:{m}" for m in merchants}


def test_a_key_naming_an_argument_the_call_lacks_is_refused(purged: Celery) -> None:
    with session_scope() as session:
        job_id = named.apply_async_on_commit(kwargs={"merchant": "acme"}, session=session)
        assert session.get(Job, job_id).concurrency_key == "acme"  # type: ignore[union-attr]
        with pytest.raises(TaskArgumentError, match="names 'merchant'"):
            named.apply_async_on_commit(("acme",), session=session)
