"""Rate limits shared by every worker, on every stack: 40 jobs over 2 keys
with a rate of 10 in any 3 seconds, all in the broker at once and run by 4
threads that claim at once (each on its own connection, as 4 workers would),
never start more than 10 of a key in a window (measured from the runs' own
start times); all 40 run once, with no attempt counted for the deliveries
handed back to the ledger."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import delete, func, insert, select, update

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import Jobs, SqlAlchemyTask, TaskArgumentError, shared_task
from proj.jobs.clock import utcnow
from proj.jobs.models import Job, RateStart, State
from proj.jobs.relay import Relay

LIMIT, PERIOD = 10, 3.0
SLACK = 0.3
"""Seconds a run may start after its claim (the claim is what the rate counts)."""
STARTS: list[tuple[str, float]] = []
"""Each run of ``charge``: its provider, and when it started."""
_lock = threading.Lock()


@shared_task(
    name="tests.rates.charge", bind=True, ignore_result=True, rate=("provider:{0}", "10/3s")
)
def charge(self: SqlAlchemyTask, provider: str) -> None:
    with _lock:
        STARTS.append((provider, time.time()))


@shared_task(name="tests.rates.report", ignore_result=True, rate="2/m")
def report(name: str) -> None:
    """A rate for the task as a whole."""


def most_in_a_window(starts: list[float], window: float) -> int:
    """The most of ``starts`` that fall in any ``window`` seconds."""
    starts = sorted(starts)
    return max(
        sum(1 for later in starts[n:] if later - first < window) for n, first in enumerate(starts)
    )


def test_no_key_starts_more_than_its_rate_in_any_window(purged: Celery) -> None:
    providers = ["acme", "globex"]
    STARTS.clear()
    with session_scope() as session:
        # All at once in the broker (the fast path): only the claims hold the rate.
        job_ids = [
            charge.apply_async_on_commit((p,), session=session)
            for p in providers
            for _ in range(20)
        ]
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=4):
        proj.jobs.testing.wait_for(lambda: len(STARTS) >= 40, timeout=120)
    by_key: dict[str, list[float]] = defaultdict(list)
    for provider, started in STARTS:
        by_key[provider].append(started)
    assert sorted(by_key) == providers
    assert all(len(starts) == 20 for starts in by_key.values()), "each job ran once"
    # The rate was reached, and never passed.
    assert {most_in_a_window(s, PERIOD - SLACK) for s in by_key.values()} == {LIMIT}
    with session_scope() as session:
        done = session.execute(
            select(Job.state, Job.attempts, func.count())
            .where(Job.id.in_(job_ids))
            .group_by(Job.state, Job.attempts)
        ).all()
        keys = set(session.scalars(select(Job.rate_key).where(Job.id.in_(job_ids))))
        recorded = session.scalar(
            select(func.count()).where(RateStart.key.in_([f"provider:{p}" for p in providers]))
        )
    assert [tuple(row) for row in done] == [(State.SUCCEEDED, 1, 40)]
    assert keys == {f"provider:{p}" for p in providers}
    assert recorded and recorded <= 2 * LIMIT, "starts out of every window are forgotten"


def test_the_relay_publishes_no_more_than_a_window_has_room_for(purged: Celery) -> None:
    with session_scope() as session:
        job_ids = [charge.apply_async_on_commit(("initech",), session=session) for _ in range(25)]
    purged.control.purge()
    jobs = Jobs.of(purged)
    with jobs.engine.begin() as connection:  # owed, as if the fast path had missed them
        connection.execute(update(Job).where(Job.id.in_(job_ids)).values(published_at=None))
    relay = Relay(purged, jobs.engine)
    # Room for 10 in the window: the other 15 wait in the ledger, and the
    # 10 sent but not yet started still count.
    assert [relay.relay_once(), relay.relay_once()] == [LIMIT, 0]
    with jobs.engine.begin() as connection:
        connection.execute(delete(RateStart).where(RateStart.key == "provider:initech"))
        connection.execute(
            insert(RateStart).values(
                [{"key": "provider:initech", "until": utcnow() + timedelta(minutes=1)}] * 3
            )
        )
        # Those 10 started meanwhile (3 of them still in the window).
        connection.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.published_at.is_not(None))
            .values(state=State.SUCCEEDED)
        )
    assert relay.relay_once() == LIMIT - 3


def test_a_rate_is_kept_in_the_row_and_a_bad_one_refused(purged: Celery) -> None:
    with session_scope() as session:
        job_id = report.apply_async_on_commit(("daily",), session=session)
        row = session.get(Job, job_id)
        assert row is not None
        assert (row.rate_key, row.rate_limit, row.rate_period) == ("tests.rates.report", 2, 60.0)
        report.rate = "two a minute"  # type: ignore[attr-defined]
        try:
            with pytest.raises(TaskArgumentError, match="a rate is N/s, N/m or N/h"):
                report.apply_async_on_commit(("daily",), session=session)
        finally:
            report.rate = "2/m"  # type: ignore[attr-defined]
