"""enqueue_many on real databases and brokers: 10,000 jobs written in one
transaction run once each on a real worker, published by the relay; a
transaction or savepoint rolled back leaves no row, no message and no count."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from prometheus_client import REGISTRY
from sqlalchemy import func, select

import proj.jobs.testing
from proj.db import Session, session_scope
from proj.jobs import ledger, shared_task
from proj.jobs.models import FINISHED, Job, State
from proj.models import Invoice, User

if TYPE_CHECKING:
    from conftest import Stack

BATCH = {"pg-rabbit": 10_000, "pg-redis": 1_000, "sqlite": 300}
"""Jobs of a stack's batch. 10,000 runs take about a minute on pg-rabbit's
in-process worker (on 2 cores), a minute and a half on pg-redis's; the
other stacks run enough for two of the relay's batches, or one on the
embedded stack, whose broker and database are one SQLite writer each."""


@shared_task(name="tests.enqueue_many.bill", ignore_result=True)
def bill(user_id: int, number: int) -> int:
    """The effect: one invoice of ``number`` cents for ``user_id``."""
    Session.add(Invoice(user_id=user_id, amount_cents=number))
    return number


def new_user() -> int:
    with session_scope() as session:
        user = User(email=f"many-{uuid.uuid4().hex}@example.com")
        session.add(user)
        session.flush()
        return user.id


def queue_size(celery_app: Celery, queue: str = "celery") -> int:
    """Messages ready in ``queue`` (declared if missing, as Celery declares it)."""
    with celery_app.connection_for_write() as connection:
        bound = celery_app.amqp.queues[queue](connection.default_channel)
        bound.declare()
        declared: Any = bound.queue_declare()  # kombu's stubs say str | None
        return int(declared.message_count)


def states(job_ids: list[str]) -> dict[str, int]:
    with session_scope() as session:
        counted = session.execute(
            select(Job.state, func.count()).where(Job.id.in_(job_ids)).group_by(Job.state)
        )
        return {state: int(n) for state, n in counted}


def finished(job_ids: list[str]) -> int:
    with session_scope() as session:
        query = select(func.count()).where(Job.id.in_(job_ids), Job.state.in_(FINISHED))
        return int(session.scalar(query) or 0)


def effects(user_id: int) -> dict[int, int]:
    """How many invoices ``user_id`` has, by amount (one amount a job)."""
    with session_scope() as session:
        counted = session.execute(
            select(Invoice.amount_cents, func.count())
            .where(Invoice.user_id == user_id)
            .group_by(Invoice.amount_cents)
        )
        return {amount: int(n) for amount, n in counted}


def enqueued_total() -> float:
    """``proj_jobs_enqueued_total`` of ``bill``, in this process."""
    value = REGISTRY.get_sample_value("proj_jobs_enqueued_total", {"task": bill.name})
    return value or 0.0


def test_a_batch_in_one_transaction_runs_once_each(stack: Stack, purged: Celery) -> None:
    """10,000 rows in one transaction (on pg-rabbit), none published by the
    commit; the worker's relay publishes them and each runs exactly once."""
    count = BATCH[stack.name]
    user_id = new_user()
    before = enqueued_total()
    with session_scope() as session:
        job_ids = bill.enqueue_many([(user_id, n) for n in range(1, count + 1)], session=session)
    assert len(set(job_ids)) == count
    assert states(job_ids) == {State.QUEUED: count}
    assert enqueued_total() == before + count
    assert queue_size(purged) == 0, "the commit published the batch: the relay's to do"

    with proj.jobs.testing.worker(purged, pool="threads", concurrency=4):
        proj.jobs.testing.wait_for(
            lambda: finished(job_ids) == count, timeout=60 + count / 20, interval=0.5
        )

    assert states(job_ids) == {State.SUCCEEDED: count}
    with session_scope() as session:
        query = select(func.count()).where(Job.id.in_(job_ids), Job.attempts != 1)
        assert session.scalar(query) == 0
    assert effects(user_id) == dict.fromkeys(range(1, count + 1), 1)


def test_a_rolled_back_batch_leaves_no_row_no_message_and_no_count(purged: Celery) -> None:
    user_id = new_user()
    before = enqueued_total()
    job_ids: list[str] = []
    with pytest.raises(RuntimeError, match="rolled back as asked"), session_scope() as session:
        job_ids += bill.enqueue_many([(user_id, n) for n in range(1, 101)], session=session)
        raise RuntimeError("rolled back as asked")

    assert len(job_ids) == 100
    assert states(job_ids) == {}
    assert queue_size(purged) == 0
    assert enqueued_total() == before


def test_a_batch_in_a_rolled_back_savepoint_is_dropped_alone(purged: Celery) -> None:
    """The outer transaction's batch is written and counted; the batch of the
    savepoint rolled back inside it is neither."""
    user_id = new_user()
    before = enqueued_total()
    with session_scope() as session:
        kept = bill.enqueue_many([(user_id, 1), (user_id, 2)], session=session)
        savepoint = session.begin_nested()
        dropped = bill.enqueue_many([(user_id, 3), (user_id, 4)], session=session)
        savepoint.rollback()

    assert states(kept + dropped) == {State.QUEUED: 2}
    assert states(kept) == {State.QUEUED: 2}
    assert enqueued_total() == before + 2
    assert queue_size(purged) == 0
    with session_scope() as session:  # no later test's relay publishes them
        for job_id in kept:
            ledger.cancel(session, job_id)
