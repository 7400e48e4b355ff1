"""retry_on on a real worker: named errors retry with growing countdowns and a
rolled-back session, then end as dead letters; other errors fail at once; a
named error raised by the commit is retried too; a missing id is no error."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise
from logging.handlers import BufferingHandler
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery, Task, shared_task
from sqlalchemy import event, select, text

import proj.jobs.testing
from proj.db import Session, session_scope
from proj.jobs import SqlAlchemyTask
from proj.jobs.models import Job
from proj.jobs.retry import TRANSIENT_ERRORS, retry_on
from proj.models import MAX_ID, User
from proj.tasks import charge_invoice, send_welcome

if TYPE_CHECKING:
    from conftest import Stack

COUNTDOWNS: defaultdict[str, list[float]] = defaultdict(list)
"""The countdowns Celery was given for each retry, by the task's first argument."""


class Hiccup(Exception):
    """A made-up error the test tasks name in ``retry_on``."""


class CountdownRecordingTask(SqlAlchemyTask):
    """SqlAlchemyTask, noting the countdown each retry is published with."""

    def apply_async(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        if options.get("countdown") is not None and args:
            COUNTDOWNS[args[0]].append(options["countdown"])
        return super().apply_async(args, kwargs, **options)


def new_email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}@example.com"


def note_attempt(email: str, attempt: int) -> None:
    """Commit a row saying attempt ``attempt`` ran (and when: its ``created_at``)."""
    with session_scope() as session:
        session.add(User(email=f"attempt{attempt}.{email}"))


def attempts(email: str) -> list[tuple[str, Any]]:
    """The attempt rows of ``email``, oldest first, with their times."""
    with session_scope() as session:
        rows = session.execute(
            select(User.email, User.created_at)
            .where(User.email.like(f"attempt%.{email}"))
            .order_by(User.id)
        )
        return [(row.email.split(".", 1)[0], row.created_at) for row in rows]


def work_rows(email: str) -> list[str]:
    """Rows written through the task's own session (committed ones only)."""
    with session_scope() as session:
        return list(session.scalars(select(User.email).where(User.email.like(f"work%.{email}"))))


def dead_letters(task_id: str) -> list[Job]:
    return proj.jobs.testing.failed_jobs(task_id)


def dead_letter(task_id: str) -> Job:
    return proj.jobs.testing.failed_job(task_id)


@shared_task(
    name="tests.retry.hiccups", bind=True, ignore_result=False, base=CountdownRecordingTask
)
@retry_on(Hiccup, max_retries=3, backoff=0.2, max_backoff=0.6, jitter=False)
def hiccups(self: Task[Any, Any], email: str) -> None:
    """Note the attempt, write a row in the task's session, raise a named error."""
    retries = self.request.retries
    note_attempt(email, retries)
    Session.add(User(email=f"work{retries}.{email}"))
    Session.flush()
    raise Hiccup(f"hiccup {retries} of {email}")


@shared_task(name="tests.retry.unnamed", bind=True, ignore_result=False)
@retry_on(TRANSIENT_ERRORS, Hiccup, max_retries=3, backoff=0.01, max_backoff=0.1)
def unnamed(self: Task[Any, Any], email: str, duplicate_of: str | None) -> None:
    """Raise ValueError, or (given ``duplicate_of``) a real IntegrityError."""
    note_attempt(email, self.request.retries)
    if duplicate_of is None:
        raise ValueError(f"no good: {email}")
    Session.add(User(email=duplicate_of))
    Session.flush()


@shared_task(name="tests.retry.commit_hiccups", bind=True, ignore_result=False)
@retry_on(Hiccup, max_retries=3, backoff=0.01, max_backoff=0.1, jitter=False)
def commit_hiccups(self: Task[Any, Any], email: str, failures: int) -> int:
    """Write a row; the first ``failures`` commits raise the named error."""
    retries = self.request.retries
    Session.add(User(email=f"work{retries}.{email}"))
    if retries < failures:

        @event.listens_for(Session(), "before_commit")
        def hiccup(_: Any) -> None:
            raise Hiccup(f"commit hiccup {retries}")

    return retries


@shared_task(name="tests.retry.loses_connection", bind=True, ignore_result=False)
@retry_on(TRANSIENT_ERRORS, max_retries=2, backoff=0.01, max_backoff=0.1)
def loses_connection(self: Task[Any, Any], email: str) -> int:
    """On the first attempt, have PostgreSQL end this run's connection mid-transaction."""
    retries = self.request.retries
    Session.add(User(email=f"work{retries}.{email}"))
    pid = Session.scalar(text("SELECT pg_backend_pid()"))
    if retries == 0:
        with session_scope() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    Session.execute(text("SELECT 1"))
    return retries


@pytest.fixture(scope="module")
def running(celery_app: Celery) -> Iterator[None]:
    """An in-process threads worker shared by the module's tests."""
    celery_app.control.purge()
    with proj.jobs.testing.worker(celery_app, pool="threads", concurrency=2):
        yield


def test_named_error_backs_off_then_dead_letters(running: None) -> None:
    """Countdowns double up to the cap, each retry starts after its countdown with
    the failed attempt rolled back, and after max_retries the task is dead-lettered."""
    email = new_email("hiccups")
    result = hiccups.delay(email)
    result.get(timeout=60, propagate=False)

    assert result.state == "FAILURE"
    assert COUNTDOWNS[email] == [0.2, 0.4, 0.6]
    ran = attempts(email)
    assert [name for name, _ in ran] == ["attempt0", "attempt1", "attempt2", "attempt3"]
    gaps = [(later - earlier).total_seconds() for (_, earlier), (_, later) in pairwise(ran)]
    assert all(gap >= wait - 0.01 for gap, wait in zip(gaps, COUNTDOWNS[email], strict=True))
    assert work_rows(email) == []
    letter = dead_letter(result.id)
    assert letter.attempts == 4
    assert f"hiccup 3 of {email}" in letter.error


@pytest.mark.parametrize("duplicate", [False, True], ids=["ValueError", "IntegrityError"])
def test_unnamed_error_fails_at_once(running: None, duplicate: bool) -> None:
    """ValueError and a real IntegrityError are never retried: one attempt, one dead letter."""
    email = new_email("unnamed")
    taken = None
    if duplicate:
        taken = new_email("taken")
        with session_scope() as session:
            session.add(User(email=taken))
    result = unnamed.delay(email, taken)
    result.get(timeout=30, propagate=False)

    assert result.state == "FAILURE"
    letter = dead_letter(result.id)
    assert letter.attempts == 1
    assert ("IntegrityError" if duplicate else "ValueError") in letter.error
    assert [name for name, _ in attempts(email)] == ["attempt0"]


def test_named_commit_failure_is_retried(running: None) -> None:
    """A named error raised by the commit retries the run; the failed commits
    leave nothing behind and the third attempt commits."""
    email = new_email("commit")
    result = commit_hiccups.delay(email, 2)

    assert result.get(timeout=30) == 2
    assert work_rows(email) == [f"work2.{email}"]
    assert dead_letters(result.id) == []


def test_lost_connection_is_retried(running: None, stack: Stack) -> None:
    """A run whose connection the server ends is retried on a new connection,
    and the broken one does not stay checked out."""
    if not stack.on_postgres:
        pytest.skip("ending one connection from the server side needs PostgreSQL")
    start = proj.jobs.testing.checked_out()
    email = new_email("lost")
    result = loses_connection.delay(email)

    assert result.get(timeout=30) == 1
    assert work_rows(email) == [f"work1.{email}"]
    proj.jobs.testing.wait_for(lambda: proj.jobs.testing.checked_out() == start)


def test_missing_id_is_logged_not_retried(running: None) -> None:
    """A task given an id that names nothing logs it and succeeds with None, once
    (``charge_invoice`` stores its result; ``send_welcome`` stores none)."""
    handler = BufferingHandler(capacity=1000)
    logger = logging.getLogger("proj.tasks")  # the worker stops task loggers propagating
    logger.addHandler(handler)
    expected = [
        f"send_welcome: no user with id {MAX_ID}; nothing sent",
        f"charge_invoice: no invoice with id {MAX_ID}; nothing charged",
    ]

    def warnings() -> list[str]:
        return [r.getMessage() for r in handler.buffer if r.levelno == logging.WARNING]

    try:
        results = [send_welcome.delay(MAX_ID), charge_invoice.delay(MAX_ID)]
        assert results[1].get(timeout=30) is None
        assert results[1].state == "SUCCESS"
        proj.jobs.testing.wait_for(lambda: set(expected) <= set(warnings()))
        time.sleep(0.5)  # a retry, had there been one, would have logged again by now
    finally:
        logger.removeHandler(handler)

    assert sorted(warnings()) == sorted(expected)
    assert all(dead_letters(result.id) == [] for result in results)
