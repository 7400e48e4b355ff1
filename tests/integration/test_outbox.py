"""delay_on_commit on real databases and brokers: a job is published if and
only if its transaction commits (savepoints included), it never starts before
the rows its transaction wrote are visible, and never before its ETA."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from logging.handlers import BufferingHandler
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import func, orm, select

import proj.jobs.testing
from proj.db import Session, session_scope
from proj.db import db as web_db
from proj.jobs import Jobs, SqlAlchemyTask, publisher, shared_task, utcnow
from proj.jobs.models import Job, State
from proj.jobs.retry import TRANSIENT_ERRORS, retry_on
from proj.models import User

RAN: list[str] = []
"""The ids of the jobs ``needs_user`` ran, in this process."""


@shared_task(name="tests.outbox.needs_user", bind=True, ignore_result=True)
@retry_on(TRANSIENT_ERRORS, backoff=0.05, max_backoff=0.2)
def needs_user(self: SqlAlchemyTask, user_id: int) -> int:
    """Load the user the enqueuing transaction wrote; fail loudly if it is not there."""
    if Session.get(User, user_id) is None:
        raise LookupError(f"user {user_id} is not visible to the worker")
    RAN.append(str(self.request.id))
    return user_id


@shared_task(name="tests.outbox.hands_on", bind=True, ignore_result=True)
def hands_on(self: SqlAlchemyTask, user_id: int) -> str:
    """Enqueue ``needs_user`` in the run's transaction; its job id."""
    return needs_user.apply_async_on_commit((user_id,), session=self.session)


@pytest.fixture
def task_log() -> Iterator[BufferingHandler]:
    """What ``proj.jobs.worker`` logs, from INFO up (the worker sets the root level to WARNING)."""
    handler = BufferingHandler(capacity=100_000)
    logger = logging.getLogger("proj.jobs.worker")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def new_email() -> str:
    return f"outbox-{uuid.uuid4().hex}@example.com"


def queue_size(celery_app: Celery, queue: str = "celery") -> int:
    """Messages ready in ``queue`` (declared if missing, as Celery declares it)."""
    with celery_app.connection_for_write() as connection:
        bound = celery_app.amqp.queues[queue](connection.default_channel)
        bound.declare()
        return int(bound.queue_declare().message_count)


def rows(*job_ids: str) -> dict[str, Job]:
    """The ledger rows of ``job_ids`` that exist (detached)."""
    with session_scope() as session:
        found = list(session.scalars(select(Job).where(Job.id.in_(job_ids))))
        session.expunge_all()
        return {job.id: job for job in found}


def states(job_ids: list[str]) -> dict[str, int]:
    with session_scope() as session:
        counted = session.execute(
            select(Job.state, func.count()).where(Job.id.in_(job_ids)).group_by(Job.state)
        )
        return {state: int(n) for state, n in counted}


def test_rollback_in_a_request_publishes_nothing(app: Flask, purged: Celery) -> None:
    """In a Flask request, delay_on_commit then rollback leaves no ledger row
    and no message, and nothing runs; the same with commit publishes one."""
    job_ids = []
    for commit in (False, True):
        with app.test_request_context():
            user = User(email=new_email())
            web_db.session.add(user)
            web_db.session.flush()
            job_ids.append(needs_user.delay_on_commit(user.id))
            if commit:
                web_db.session.commit()
            else:
                web_db.session.rollback()
        if not commit:
            assert rows(job_ids[0]) == {}
            assert queue_size(purged) == 0

    assert Jobs.of(purged).flush()
    assert list(rows(*job_ids)) == [job_ids[1]]
    assert queue_size(purged) == 1
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for(lambda: rows(job_ids[1])[job_ids[1]].state == State.SUCCEEDED)
    assert job_ids[0] not in RAN and job_ids[1] in RAN
    assert rows(job_ids[0]) == {}


def test_rollback_in_a_script_publishes_nothing(purged: Celery) -> None:
    """In ``session_scope``, an error after delay_on_commit rolls the job back
    with the rest: no row, no message."""
    job_ids: list[str] = []
    try:
        with session_scope() as session:
            user = User(email=new_email())
            session.add(user)
            session.flush()
            job_ids.append(needs_user.apply_async_on_commit((user.id,), session=session))
            raise RuntimeError("rolled back as asked")
    except RuntimeError:
        pass
    assert rows(*job_ids) == {}
    assert queue_size(purged) == 0


def test_savepoints_publish_with_the_outer_transaction(purged: Celery) -> None:
    """A savepoint released after the enqueue publishes nothing before the
    outer commit; one rolled back drops only the jobs enqueued inside it; the
    jobs of the outer transaction are published by the fast path on commit."""
    with session_scope() as session:
        outer = User(email=new_email())
        session.add(outer)
        session.flush()
        kept = needs_user.apply_async_on_commit((outer.id,), session=session)
        with session.begin_nested():
            session.add(User(email=new_email()))
        assert queue_size(purged) == 0, "published when a savepoint was released"
        savepoint = session.begin_nested()
        inner = User(email=new_email())
        session.add(inner)
        session.flush()
        dropped = needs_user.apply_async_on_commit((inner.id,), session=session)
        savepoint.rollback()
        assert queue_size(purged) == 0

    assert Jobs.of(purged).flush()
    found = rows(kept, dropped)
    assert list(found) == [kept]
    assert found[kept].published_at is not None, "the fast path forgot the outer job"
    assert queue_size(purged) == 1


def test_a_commit_hands_its_jobs_to_the_publishing_thread(
    purged: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script's commit returns before its job is published: the process's
    publishing thread publishes it and marks it. A job enqueued in a task run
    is published in the run's own thread, as the run commits."""
    sent_by: dict[str, str] = {}
    send = publisher.send

    def recording(celery_app: Celery, message: Any, *args: Any, **kwargs: Any) -> None:
        sent_by[message["id"]] = threading.current_thread().name
        send(celery_app, message, *args, **kwargs)

    monkeypatch.setattr(publisher, "send", recording)
    with session_scope() as session:
        user = User(email=new_email())
        session.add(user)
        session.flush()
        first = hands_on.apply_async_on_commit((user.id,), session=session)
    assert Jobs.of(purged).flush()
    assert sent_by == {first: "proj-sender"}
    assert rows(first)[first].published_at is not None
    with proj.jobs.testing.worker(purged):
        done = proj.jobs.testing.wait_for_state(first, State.SUCCEEDED, celery_app=purged)
        second = str(done.result)
        proj.jobs.testing.wait_for_state(second, State.SUCCEEDED, celery_app=purged)
    assert set(sent_by) == {first, second}
    assert sent_by[second] != "proj-sender"


def test_a_session_closed_without_commit_publishes_nothing(purged: Celery) -> None:
    """A session closed with its transaction still open drops the jobs it
    held: committing later in the same session does not publish them."""
    session = orm.Session(proj.db.worker_engine())
    try:
        user = User(email=new_email())
        session.add(user)
        session.flush()
        dropped = needs_user.apply_async_on_commit((user.id,), session=session)
        session.close()
        session.add(User(email=new_email()))
        session.commit()
    finally:
        session.close()
    assert rows(dropped) == {}
    assert queue_size(purged) == 0


def test_a_thousand_jobs_always_find_their_rows(
    app: Flask, purged: Celery, task_log: BufferingHandler
) -> None:
    """1,000 jobs enqueued in the transactions that create their users (in
    requests and in scripts, 200 transactions that go on a little after the
    enqueue), with a worker running all along: every job finds its user and
    ends succeeded at its first delivery (none was skipped for want of its
    ledger row, which a message published before the commit would be)."""
    job_ids: list[str] = []
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=4):
        for n in range(200):
            if n % 2:
                with app.app_context():
                    users = [User(email=new_email()) for _ in range(5)]
                    web_db.session.add_all(users)
                    web_db.session.flush()
                    job_ids += [needs_user.delay_on_commit(user.id) for user in users]
                    time.sleep(0.005)  # the request goes on after the enqueue
                    web_db.session.commit()
            else:
                with session_scope() as session:
                    users = [User(email=new_email()) for _ in range(5)]
                    session.add_all(users)
                    session.flush()
                    job_ids += [
                        needs_user.apply_async_on_commit((user.id,), session=session)
                        for user in users
                    ]
                    time.sleep(0.005)
        proj.jobs.testing.wait_for(
            lambda: (
                states(job_ids).get(State.SUCCEEDED, 0) + states(job_ids).get(State.FAILED, 0)
                == len(job_ids)
            ),
            timeout=180,
            interval=0.2,
        )

    assert len(set(job_ids)) == 1000
    assert states(job_ids) == {State.SUCCEEDED: 1000}
    assert all(job.attempts == 1 for job in rows(*job_ids).values())
    mine = set(job_ids)
    skipped = [r.getMessage() for r in task_log.buffer if any(i in r.getMessage() for i in mine)]
    assert skipped == []


def test_countdown_and_eta_are_honoured(purged: Celery) -> None:
    """Jobs enqueued with a countdown or an ETA start no earlier than the
    ``available_at`` the ledger holds for them, which is that far ahead."""
    with session_scope() as session:
        users = [User(email=new_email()) for _ in range(2)]
        session.add_all(users)
        session.flush()
        later = needs_user.apply_async_on_commit((users[0].id,), session=session, countdown=1.5)
        eta = utcnow() + timedelta(seconds=1.5)
        at_eta = needs_user.apply_async_on_commit((users[1].id,), session=session, eta=eta)
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(
            lambda: {job.state for job in rows(later, at_eta).values()} == {State.SUCCEEDED}
        )

    found = rows(later, at_eta)
    assert found[at_eta].available_at == eta
    for job in found.values():
        assert job.available_at >= job.created_at + timedelta(seconds=1.4)
        assert job.started_at is not None and job.started_at >= job.available_at
