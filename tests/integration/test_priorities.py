"""Priorities honoured: the relay publishes the jobs the broker delivers
first first (on every stack), and the broker's own queues are priority
queues (RabbitMQ's ``x-max-priority``, Redis's priority lists), so jobs sent
after a thousand others still start before them."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import select, update

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import Jobs, SqlAlchemyTask, shared_task
from proj.jobs.models import Job, State
from proj.jobs.publisher import priorities_first
from proj.jobs.relay import make_relay

STARTED: list[str] = []
"""The ids of the jobs this module's task ran, in the order they started."""


@shared_task(name="tests.priorities.note", bind=True, ignore_result=True)
def note(self: SqlAlchemyTask) -> None:
    STARTED.append(str(self.request.id))


def test_the_relay_publishes_the_first_delivered_priority_first(purged: Celery) -> None:
    """100 jobs of the priority the broker delivers last, then 10 of the one
    it delivers first, all owed: a relay pass of 10 publishes the 10."""
    first, last = priorities_first(purged)[0], priorities_first(purged)[-1]
    with session_scope() as session:
        note.enqueue_many([() for _ in range(100)], session=session, priority=last)
        urgent = note.enqueue_many([() for _ in range(10)], session=session, priority=first)
    relay = make_relay(purged)
    relay.grace, relay.batch_size = 0.0, 10
    try:
        assert relay.relay_once() == 10
    finally:
        relay.engine.dispose()
    with session_scope() as session:
        published = set(
            session.scalars(
                select(Job.id).where(
                    Job.published_at.is_not(None), Job.name == note.name, Job.state == State.QUEUED
                )
            )
        )
    assert published == set(urgent)


def test_jobs_sent_after_a_thousand_start_before_them(purged: Celery, stack: object) -> None:
    """1,000 jobs of the last-delivered priority are in the broker, then 10 of
    the first: a worker (one process, Celery's prefetch of 4) starts the 10
    before all but the few it had prefetched."""
    if not getattr(stack, "on_postgres", False):
        pytest.skip("the embedded SQLite broker has no priorities: the relay's order only")
    first, last = priorities_first(purged)[0], priorities_first(purged)[-1]
    with session_scope() as session:
        slow = [note.apply_async_on_commit(session=session, priority=last) for _ in range(1000)]
    assert Jobs.of(purged).flush()
    with session_scope() as session:
        urgent = [note.apply_async_on_commit(session=session, priority=first) for _ in range(10)]
    assert Jobs.of(purged).flush()
    STARTED.clear()
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for(lambda: set(urgent) <= set(STARTED), timeout=120)
    order = [job_id for job_id in STARTED if job_id in {*slow, *urgent}]
    latest = max(order.index(job_id) for job_id in urgent)
    assert latest < 10 + 4 + 2, f"the last urgent job started {latest + 1}th"
    # The slow ones that did not run are of no other test's concern.
    purged.control.purge()
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(slow), Job.state == State.QUEUED)
            .values(state=State.CANCELLED)
        )


def test_a_queue_declared_before_without_priorities_keeps_its_jobs_owed(
    purged: Celery, stack: object
) -> None:
    """RabbitMQ refuses to declare a plain queue again as a priority queue (an
    upgrade's old queue): the relay keeps its jobs owed, failing none of
    them; once the queue is gone, it publishes them."""
    if not getattr(stack, "on_postgres", False):
        pytest.skip("the embedded broker's queues take no arguments")
    queue = f"tests.priorities.{uuid.uuid4().hex}"
    with purged.connection_for_write() as connection:
        if connection.transport.driver_type != "amqp":
            pytest.skip("only RabbitMQ's queues have arguments to disagree on")
        old = Queue(queue, Exchange(queue), routing_key=queue)(connection.default_channel)
        old.declare()
    with session_scope() as session:
        job_ids = note.enqueue_many([() for _ in range(3)], session=session, queue=queue)
    relay = make_relay(purged)
    relay.grace = 0.0
    try:
        assert relay.relay_once() == 0
        with session_scope() as session:
            waiting = session.scalars(
                select(Job.state).where(Job.id.in_(job_ids), Job.published_at.is_(None))
            ).all()
        assert waiting == [State.QUEUED] * 3
        with purged.connection_for_write() as connection:
            old(connection.default_channel).delete()
        assert relay.relay_once() == 3
    finally:
        relay.engine.dispose()
    with purged.connection_for_write() as connection:
        purged.amqp.queues[queue](connection.default_channel).delete()
