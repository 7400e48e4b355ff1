"""SqlAlchemyTask's unit of work on real workers and databases: one session per
run, commit before success, rollback on every other ending, and the connection
back in the pool whatever way the run ends."""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import pytest
from celery import Celery, Task, shared_task
from celery.exceptions import Ignore, Reject
from celery.result import AsyncResult
from flask import Flask
from sqlalchemy import event, func, inspect, orm, select, text
from sqlalchemy.util import ScopedRegistry

import proj.jobs.testing
from proj.db import Session, session_scope
from proj.db import db as web_db
from proj.jobs import TaskArgumentError
from proj.jobs.models import Job
from proj.jobs.retry import retry_on
from proj.models import User

if TYPE_CHECKING:
    from conftest import Stack

SEEN: defaultdict[str, list[Any]] = defaultdict(list)
"""What the test tasks observed while running, by the key the test gave them."""
MEETINGS: dict[str, threading.Barrier] = {}
"""Barriers two concurrent runs wait at, by key."""


class Hiccup(Exception):
    """A made-up error the test tasks name in ``retry_on``."""


def new_email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}@example.com"


def committed(*emails: str) -> set[str]:
    """Which of ``emails`` another connection sees committed."""
    with session_scope() as session:
        return set(session.scalars(select(User.email).where(User.email.in_(emails))))


def task_sessions() -> int:
    """Sessions the task-scoped registry holds (a run's goes when the run ends)."""
    return len(cast(ScopedRegistry[Any], Session.registry).registry)


def dead_letters(task_id: str) -> list[Job]:
    return proj.jobs.testing.failed_jobs(task_id)


def dead_letter(task_id: str) -> Job:
    return proj.jobs.testing.failed_job(task_id)


@shared_task(name="tests.session.outcome", bind=True, ignore_result=False)
@retry_on(Hiccup, max_retries=2, backoff=0.01, max_backoff=0.1, jitter=False)
def outcome(self: Task[Any, Any], email: str, ending: str) -> str:
    """Write a row, note the checked-out count, then end as ``ending`` says."""
    Session.add(User(email=f"{self.request.retries}.{email}"))
    Session.flush()
    SEEN[email].append(proj.jobs.testing.checked_out())
    if ending == "fail":
        raise ValueError(f"failing as asked: {email}")
    if ending == "retry" and self.request.retries == 0:
        raise Hiccup(f"retry as asked: {email}")
    if ending == "ignore":
        raise Ignore()
    if ending == "reject":
        raise Reject("rejecting as asked", requeue=False)
    return email


@shared_task(name="tests.session.rendezvous")
def rendezvous(key: str) -> None:
    """Note this run's session and database connection, then wait for the other run."""
    session = Session()
    if session.get_bind().dialect.name == "postgresql":
        backend = session.scalar(text("SELECT pg_backend_pid()"))
    else:
        session.execute(text("SELECT 1"))
        backend = id(session.connection().connection.dbapi_connection)
    SEEN[key].append((id(session), backend))
    MEETINGS[key].wait()
    SEEN[f"{key}/met"].append(True)


@shared_task(name="tests.session.add_user")
def add_user(email: str, seen_email: str | None = None) -> dict[str, int]:
    """Add a user; say which session did it and whether ``seen_email`` is visible."""
    session = Session()
    seen = session.scalar(select(func.count()).where(User.email == seen_email)) or 0
    session.add(User(email=email))
    return {"session": id(session), "seen": seen}


@shared_task(name="tests.session.read_user")
def read_user(email: str) -> int:
    """How many users with ``email`` this run's session sees."""
    return Session.scalar(select(func.count()).where(User.email == email)) or 0


@shared_task(name="tests.session.outer", ignore_result=False)
def outer(email: str, direct_email: str, eager_email: str) -> dict[str, Any]:
    """Add a row without flushing, run add_user directly and eagerly, report."""
    session = Session()
    mine = User(email=email)
    session.add(mine)
    direct = add_user(direct_email)
    eager = add_user.apply(args=(eager_email,)).get(disable_sync_subtasks=False)
    return {
        "outer": id(session),
        "direct": direct["session"],
        "eager": eager["session"],
        "same_session_after": Session() is session,
        "still_pending": mine in session.new,
    }


@shared_task(name="tests.session.commit_probe", bind=True, ignore_result=False, track_started=True)
def commit_probe(self: Task[Any, Any], email: str) -> None:
    """Add a row; when it commits, note what the result backend says of this run."""
    session = Session()
    session.add(User(email=email))
    result: AsyncResult[Any] = AsyncResult(str(self.request.id), app=self.app)

    @event.listens_for(session, "after_commit")
    def note_state(_: Any) -> None:
        SEEN[email].append(result.state)


@shared_task(name="tests.session.add_late", ignore_result=False)
def add_late(new: str, duplicate: str) -> None:
    """Add two users, the second a duplicate; nothing flushes before the commit."""
    Session.add(User(email=new))
    Session.add(User(email=duplicate))


@pytest.fixture(scope="module", params=["threads", "solo"])
def running(request: pytest.FixtureRequest, celery_app: Celery) -> Iterator[str]:
    """An in-process worker on the pool named (shared by the module's tests)."""
    celery_app.control.purge()
    with proj.jobs.testing.worker(celery_app, pool=request.param, concurrency=2):
        yield request.param


def test_every_ending_returns_the_connection(running: str) -> None:
    """Success, failure, retry, Ignore and Reject each give the connection back;
    only what the successful runs wrote is committed."""
    start, sessions = proj.jobs.testing.checked_out(), task_sessions()
    emails = {ending: new_email(ending) for ending in ("ok", "fail", "retry", "ignore", "reject")}
    results = {ending: outcome.delay(email, ending) for ending, email in emails.items()}
    runs = {email: 2 if ending == "retry" else 1 for ending, email in emails.items()}
    proj.jobs.testing.wait_for(lambda: all(len(SEEN[e]) == n for e, n in runs.items()))
    proj.jobs.testing.wait_for(lambda: proj.jobs.testing.checked_out() == start)
    proj.jobs.testing.wait_for(lambda: task_sessions() == sessions)

    assert all(count > start for e in runs for count in SEEN[e]), "every run held a connection"
    assert results["ok"].get(timeout=30) == emails["ok"]
    assert results["retry"].get(timeout=30) == emails["retry"]
    assert results["fail"].get(timeout=30, propagate=False) and results["fail"].failed()
    assert dead_letter(results["fail"].id).attempts == 1
    written = [f"{n}.{email}" for email in emails.values() for n in (0, 1)]
    assert committed(*written) == {f"0.{emails['ok']}", f"1.{emails['retry']}"}


def both_met(key: str) -> bool:
    return len(SEEN[f"{key}/met"]) == 2


@pytest.mark.parametrize("running", ["threads"], indirect=True)
def test_concurrent_runs_have_their_own_sessions(running: str) -> None:
    """Two runs overlapping on the threads pool never share a session or a
    connection, even when the same message is delivered twice."""
    start = proj.jobs.testing.checked_out()
    apart, same = uuid.uuid4().hex, uuid.uuid4().hex
    for key in (apart, same):
        MEETINGS[key] = threading.Barrier(2, timeout=30)
    rendezvous.delay(apart)
    rendezvous.delay(apart)
    # Celery's database result backend cannot store two runs of one id at once.
    twice = str(uuid.uuid4())
    rendezvous.apply_async((same,), task_id=twice, ignore_result=True)
    rendezvous.apply_async((same,), task_id=twice, ignore_result=True)

    for key in (apart, same):
        proj.jobs.testing.wait_for(partial(both_met, key))  # the two runs overlapped
        (session_a, backend_a), (session_b, backend_b) = SEEN[key]
        assert session_a != session_b
        assert backend_a != backend_b
    proj.jobs.testing.wait_for(lambda: proj.jobs.testing.checked_out() == start)


@pytest.mark.parametrize("running", ["threads"], indirect=True)
def test_task_called_inside_a_task_leaves_the_callers_session(running: str) -> None:
    """A task called directly or eagerly from a running task commits its own
    session only: the caller's session and its pending row are untouched."""
    mine, direct, eager = new_email("outer"), new_email("direct"), new_email("eager")
    report = outer.delay(mine, direct, eager).get(timeout=30)

    assert report["still_pending"] and report["same_session_after"]
    assert report["outer"] not in (report["direct"], report["eager"])
    assert committed(mine, direct, eager) == {mine, direct, eager}


@pytest.mark.parametrize("running", ["threads"], indirect=True)
def test_commit_happens_before_success_is_reported(running: str) -> None:
    """The row is committed while the run is still STARTED, so SUCCESS means committed."""
    email = new_email("probe")
    commit_probe.delay(email).get(timeout=30)

    assert SEEN[email] == ["STARTED"]
    assert committed(email) == {email}


@pytest.mark.parametrize("running", ["threads"], indirect=True)
def test_failed_commit_fails_the_task(running: str) -> None:
    """A unique violation found only at commit makes a FAILURE with a dead letter,
    and nothing of the run is committed."""
    taken, new = new_email("taken"), new_email("new")
    with session_scope() as session:
        session.add(User(email=taken))
    result = add_late.delay(new, taken)
    result.get(timeout=30, propagate=False)

    assert result.state == "FAILURE"
    letter = dead_letter(result.id)
    assert "IntegrityError" in letter.error
    assert committed(new, taken) == {taken}


def test_eager_task_in_a_request_leaves_the_request_transaction(app: Flask) -> None:
    """An eager task run inside a request neither commits nor closes the
    request's session: its flushed row stays uncommitted until the request commits."""
    email = new_email("request")
    with app.test_request_context():
        web_db.session.add(User(email=email))
        web_db.session.flush()
        transaction = web_db.session().get_transaction()
        assert transaction is not None

        assert read_user.apply(args=(email,)).get() == 0
        assert web_db.session().get_transaction() is transaction and transaction.is_active
        assert committed(email) == set()
        web_db.session.commit()
    assert committed(email) == {email}


def test_eager_task_in_a_request_commits_only_its_own_work(app: Flask, stack: Stack) -> None:
    """An eager task writing inside a request commits its row, not the request's."""
    if not stack.on_postgres:
        pytest.skip(
            "SQLite has one writer at a time: the task's insert would wait for the "
            "request's uncommitted write (the read-only case runs on SQLite too)"
        )
    mine, theirs = new_email("request"), new_email("eager")
    with app.test_request_context():
        row = User(email=mine)
        web_db.session.add(row)
        web_db.session.flush()
        transaction = web_db.session().get_transaction()
        assert transaction is not None

        assert add_user.apply(args=(theirs, mine)).get()["seen"] == 0
        assert committed(mine, theirs) == {theirs}
        assert web_db.session().get_transaction() is transaction and transaction.is_active
        assert row in web_db.session and inspect(row).persistent
        web_db.session.rollback()
    assert committed(mine, theirs) == {theirs}


def test_orm_object_is_refused_at_enqueue(celery_app: Celery) -> None:
    """apply_async and delay refuse a User (naming its id) and a non-JSON value;
    the broker's queue holds only the one good message sent afterwards."""
    queue = f"tests.refused.{uuid.uuid4().hex}"
    with session_scope() as session:
        user = User(email=new_email("object"))
        session.add(user)
        session.flush()
        user_id = user.id
    try:
        with pytest.raises(TaskArgumentError, match=rf"\(id {user_id}\).*pass the object's id"):
            add_user.apply_async((user,), queue=queue)
        with pytest.raises(TaskArgumentError, match="pass the object's id"):
            add_user.s(new_email("x"), {"who": [user]}).set(queue=queue).delay()
        with pytest.raises(TaskArgumentError, match="pass the object's id"):
            add_user.apply_async((object(),), queue=queue)
        good = new_email("good")
        add_user.apply_async((good,), queue=queue)

        waiting: list[Any] = []

        def arrived() -> bool:
            waiting.extend(take_messages(celery_app, queue))
            return bool(waiting)

        proj.jobs.testing.wait_for(arrived)
        assert waiting == [[good]]
    finally:
        delete_queue(celery_app, queue)


def take_messages(celery_app: Celery, queue_name: str) -> list[Any]:
    """Consume what waits in ``queue_name``; return each message's arguments."""
    found = []
    with celery_app.connection_for_write() as connection:
        bound = celery_app.amqp.queues[queue_name](connection.default_channel)
        bound.declare()
        while (message := bound.get(no_ack=True)) is not None:
            found.append(message.decode()[0])
    return found


def delete_queue(celery_app: Celery, queue_name: str) -> None:
    """Delete the queue, and forget it so later workers do not consume from it."""
    with celery_app.connection_for_write() as connection:
        celery_app.amqp.queues[queue_name](connection.default_channel).delete()
    celery_app.amqp.queues.pop(queue_name, None)


def test_an_exit_after_the_commit_is_what_session_scope_raises(celery_app: Celery) -> None:
    """beat, told to stop while the fast path publishes what its transaction
    committed, gets ``SystemExit`` from inside the commit's ``after_commit``
    hooks: ``session_scope`` raises that ``SystemExit`` (beat then stops
    cleanly), not SQLAlchemy's refusal to roll back a committed transaction,
    and what was committed stays."""
    email = new_email("exit")

    def stopped(session: Any) -> None:
        if session.info.get("stop"):
            raise SystemExit()

    event.listen(orm.Session, "after_commit", stopped)
    try:
        with pytest.raises(SystemExit), session_scope() as session:
            session.info["stop"] = True
            session.add(User(email=email))
    finally:
        event.remove(orm.Session, "after_commit", stopped)
    assert committed(email) == {email}
