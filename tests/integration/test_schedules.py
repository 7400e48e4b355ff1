"""Countdowns, ETAs and retry backoffs held in the ledger, on every stack: a
job due later waits as its row, in no broker queue, and the relay publishes
it when it falls due, so a purge before then loses nothing and a job
cancelled before then is never published."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import update
from stacks import queue_depth

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import SqlAlchemyTask, shared_task, utcnow
from proj.jobs.models import Job, State
from proj.jobs.relay import make_relay
from proj.jobs.retry import retry_on

RAN: list[str] = []
"""The ids of the jobs this module's tasks ran, once per run."""


class Flaky(Exception):
    """What ``fails_once`` raises on its first attempt."""


@shared_task(name="tests.schedules.note", bind=True, ignore_result=True)
def note(self: SqlAlchemyTask) -> None:
    RAN.append(str(self.request.id))


@shared_task(name="tests.schedules.fails_once", bind=True, ignore_result=True)
@retry_on(Flaky, max_retries=2, backoff=3600, max_backoff=3600, jitter=False)
def fails_once(self: SqlAlchemyTask) -> None:
    RAN.append(str(self.request.id))
    if self.request.retries == 0:
        raise Flaky("the first attempt fails")


def row(job_id: str) -> Job:
    return proj.jobs.testing.job(job_id)


def due_now(*job_ids: str) -> None:
    """Move these jobs' due time to now (as if their time had come)."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(available_at=utcnow()))


def test_a_job_due_soon_outlives_a_purge_and_runs_once_at_its_time(purged: Celery) -> None:
    """A job due in 3 s is no message while it waits: purging the broker's
    queue meanwhile takes nothing, and it runs once, no earlier than due."""
    with session_scope() as session:
        job_id = note.apply_async_on_commit(session=session, countdown=3)
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        assert queue_depth(purged) == 0
        assert row(job_id).published_at is None
        purged.control.purge()
        proj.jobs.testing.wait_for_state(job_id, State.SUCCEEDED, timeout=30)
    job = row(job_id)
    assert RAN.count(job_id) == 1
    assert job.available_at - job.created_at >= timedelta(seconds=2.9)
    assert job.published_at is not None and job.published_at >= job.available_at
    assert job.started_at is not None and job.started_at >= job.available_at


def test_a_job_due_in_40_days_waits_in_the_ledger_until_its_time_moves(
    purged: Celery, client: FlaskClient
) -> None:
    """A job due in 40 days is in no broker queue after the relay's pass;
    moved due, the next pass publishes it. One cancelled before its time is
    never published, even once due."""
    with session_scope() as session:
        later = note.apply_async_on_commit(session=session, countdown=40 * 86400)
        cancelled = note.apply_async_on_commit(session=session, countdown=40 * 86400)
    relay = make_relay(purged)
    try:
        assert relay.relay_once() == 0
        assert queue_depth(purged) == 0
        assert relay.pause() == relay.poll_interval
        assert client.post(f"/api/jobs/{cancelled}/cancel").status_code == 200
        answer = client.get(f"/api/jobs/{later}").get_json()
        assert answer["state"] == State.QUEUED
        assert answer["due_at"] == row(later).available_at.isoformat()
        due_now(later, cancelled)
        assert relay.relay_once() == 1
    finally:
        relay.engine.dispose()
    assert queue_depth(purged) == 1
    assert row(later).published_at is not None
    assert (row(cancelled).state, row(cancelled).published_at) == (State.CANCELLED, None)
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for_state(later, State.SUCCEEDED)
    assert RAN.count(later) == 1 and cancelled not in RAN


def test_a_retry_an_hour_away_waits_as_its_row(purged: Celery) -> None:
    """A retry's backoff goes through the ledger too: an hour away, the job is
    ``retrying`` with no message anywhere; once due, it runs again."""
    with session_scope() as session:
        job_id = fails_once.apply_async_on_commit(session=session)
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for_state(job_id, State.RETRYING)
        waiting = row(job_id)
        assert waiting.published_at is None
        assert waiting.available_at - utcnow() > timedelta(minutes=59)
        assert queue_depth(purged) == 0
        due_now(job_id)
        proj.jobs.testing.wait_for_state(job_id, State.SUCCEEDED, timeout=30)
    assert RAN.count(job_id) == 2
    assert row(job_id).attempts == 2


@pytest.mark.parametrize("countdown", [0.5, 2.0])
def test_the_relay_wakes_when_the_next_job_falls_due(purged: Celery, countdown: float) -> None:
    """Between polls, the relay waits only until the next owed job is due."""
    relay = make_relay(purged)
    relay.poll_interval = 10.0
    try:
        while relay.relay_once():  # what earlier tests left owed
            pass
        with session_scope() as session:
            note.apply_async_on_commit(session=session, countdown=countdown)
        pause = relay.pause()
    finally:
        relay.engine.dispose()
    assert 0 < pause <= countdown
    purged.control.purge()
