"""The reconciler's search for lost jobs: it sends again the waiting jobs of
the queues the broker has emptied, and only those; a backlog waiting in its
queue costs it an index probe, not a read of the backlog."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import stacks
from celery import Celery
from sqlalchemy import create_engine, insert, pool, select, text
from sqlalchemy.orm import Session

from proj.db import session_scope
from proj.jobs import migrations as jobs_migrations
from proj.jobs import utcnow
from proj.jobs.engine import resolve_url
from proj.jobs.models import Job, State
from proj.jobs.reconciler import reconcile, resend_lost

if TYPE_CHECKING:
    from conftest import Stack

LONG_AGO = timedelta(hours=1)
ROWS_READ = """
SELECT sum(pg_stat_get_xact_tuples_returned(oid))
FROM pg_class WHERE oid = 'jobs'::regclass
   OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'jobs'::regclass)
"""
"""Rows and index entries this transaction has read from ``jobs``."""


def waiting(
    session: Session, queue: str | None, count: int, published: datetime, **extra: object
) -> list[str]:
    """``count`` jobs ``queued`` in ``queue``, as its option too (None: a row
    written before proj kept the queue), published at ``published``, made
    just before it."""
    ids = [uuid.uuid4().hex for _ in range(count)]
    made = published - timedelta(seconds=1)
    session.execute(
        insert(Job),
        [
            {
                "id": job_id,
                "name": "tests.reconciler.lost",
                "state": State.QUEUED,
                "created_at": made,
                "available_at": made,
                "published_at": published,
                "queue": queue,
                "options": {"queue": queue},
                **extra,
            }
            for job_id in ids
        ],
    )
    return ids


@contextmanager
def holding_a_message(celery_app: Celery, queue: str) -> Iterator[None]:
    """``queue`` holds a message on the broker meanwhile; deleted afterwards."""
    with celery_app.connection_for_write() as connection:
        held = connection.SimpleQueue(queue)
        held.put({"held": True})
        try:
            yield
        finally:
            held.queue.delete()
            held.close()


def published(job_ids: list[str]) -> dict[str, bool]:
    with session_scope() as session:
        found = session.execute(select(Job.id, Job.published_at).where(Job.id.in_(job_ids)))
        return {job_id: at is not None for job_id, at in found}


def test_only_the_jobs_of_an_emptied_queue_are_sent_again(purged: Celery) -> None:
    """Jobs published an hour ago in a queue the broker holds nothing of are
    owed again, a row that names no queue among them (its routes say where it
    went); as many in a queue that holds a message, and a job published just
    now in the empty queue, are left alone."""
    # Asked in this order: RabbitMQ closes the channel that asks for a queue it has not.
    empty, holding = f"tests.a-{uuid.uuid4().hex}", f"tests.b-{uuid.uuid4().hex}"
    past = utcnow() - LONG_AGO
    with session_scope() as session:
        lost = waiting(session, empty, 2, past)
        lost += waiting(session, None, 1, past, options={"queue": empty})
        kept = waiting(session, holding, 2, past) + waiting(session, empty, 1, utcnow())
    with holding_a_message(purged, holding), session_scope() as session:
        reconcile(session, purged, stale_after=60)
    assert published(lost + kept) == {
        **{job_id: False for job_id in lost},
        **{job_id: True for job_id in kept},
    }


def test_a_backlog_waiting_in_its_queue_is_not_read(stack: Stack, purged: Celery) -> None:
    """On a ledger of its own (PostgreSQL counts what a transaction reads):
    5,000 jobs an hour old wait in a queue that holds messages, one in a
    queue that holds none. The pass sends the one again and reads a few dozen
    rows and index entries, not the backlog."""
    if not stack.on_postgres:
        pytest.skip("the rows read are counted by PostgreSQL")
    empty, holding = f"tests.{uuid.uuid4().hex}", f"tests.{uuid.uuid4().hex}"
    past = utcnow() - LONG_AGO
    with stacks.postgres_database() as url:
        jobs_migrations.upgrade(url)
        engine = create_engine(resolve_url(url), poolclass=pool.NullPool)
        try:
            with Session(engine) as session, session.begin():
                waiting(session, holding, 5_000, past)
                waiting(session, empty, 1, past)
            with holding_a_message(purged, holding), Session(engine) as session:
                resent = resend_lost(session, purged, utcnow() - timedelta(seconds=60))
                read = session.scalar(text(ROWS_READ))
                session.commit()
        finally:
            engine.dispose()
    assert resent == 1
    assert read < 100
