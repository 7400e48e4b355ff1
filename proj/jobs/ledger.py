"""The job ledger: one row per job, in the application's database.

A job's row is written in the transaction that enqueues it, so the job exists
if and only if that transaction commits. Its state only moves forward::

    queued ──> running ──> succeeded
      │  ^        │  └───> failed        (a final error, or attempts used up)
      │  └── retrying <┘                  (a retry, or the worker was lost)
      └──> cancelled

Claiming (``queued``/``retrying`` → ``running``, attempts + 1) is a statement
committed on its own; the move to ``succeeded`` commits with the
task's own effects. Rows are also the dead-letter store: every task that
finally fails, and every message a worker cannot run, ends as a ``failed`` row.

This module is the only one that changes a job's ``state``, each change a
named function: :func:`enqueue`, :func:`claim`, :func:`succeed`,
:func:`retrying`, :func:`worker_lost`, :func:`record_failure`, :func:`cancel`,
:func:`requeue`, :func:`resend`, :func:`abandon` and :func:`prune`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    case,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.sql.elements import BindParameter

from proj.jobs.clock import UtcDateTime, utcnow
from proj.jobs.engine import autocommit
from proj.jobs.retry import TRANSIENT_ERRORS, backoff
from proj.jobs.session import session_scope

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


CLAIMABLE = (State.QUEUED, State.RETRYING)
FINISHED = (State.SUCCEEDED, State.FAILED, State.CANCELLED)
PATIENCE = 60.0
"""Seconds a ledger write keeps trying while the database is unreachable."""
TEXT_LIMIT = 20_000
"""Characters of an error, traceback or undecodable body kept in a row."""


def _clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= TEXT_LIMIT else value[:TEXT_LIMIT] + "…"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON (anything else as its repr)."""
    return json.loads(json.dumps(value, default=repr))


NAMING_CONVENTION = {
    # Constraint and index names Alembic can find again on every database.
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class LedgerBase(DeclarativeBase):
    """The ledger's own declarative base: its table is not in the application's
    metadata (the application's migrations never see it)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(LedgerBase):
    """A job: what to run, where it stands, and how it ended."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_created_at", "state", "created_at"),
        # Only rows the relay still has to publish; stays small.
        Index(
            "ix_jobs_unpublished",
            "created_at",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    """The Celery task id."""
    name: Mapped[str] = mapped_column(String(255))
    args: Mapped[Any] = mapped_column(JSON, default=list)
    kwargs: Mapped[Any] = mapped_column(JSON, default=dict)
    options: Mapped[Any] = mapped_column(JSON, default=dict)
    """Publishing options to send the message with again (queue, eta, priority…)."""
    state: Mapped[str] = mapped_column(String(16), default=State.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    available_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    """When the job may start (its ETA)."""
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    """When the broker confirmed the message; None while the relay owes it."""
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    worker: Mapped[str | None] = mapped_column(String(255))
    """``hostname:pid`` of the process running it."""
    progress: Mapped[float | None] = mapped_column(Float)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)

    def to_json(self) -> dict[str, Any]:
        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


JOBS = cast(Table, Job.__table__)


@dataclass(frozen=True)
class Claim:
    """What claiming a job's row found."""

    claimed: bool
    state: str | None
    """The row's state (after the claim); None if proj never issued the id."""
    attempts: int = 0
    max_attempts: int = 0


class Standalone:
    """A statement committed on its own, in one round trip (on an autocommit
    connection). On PostgreSQL its commit does not wait for the disk: WAL is
    flushed in order, so the next commit that does wait (the task's, the
    next request's) makes it durable too. Only for ledger writes whose loss in
    a server crash means a job is published or claimed again, which the claim
    makes harmless."""

    def __init__(self, sql: str, *binds: BindParameter[Any]) -> None:
        self.plain = text(sql).bindparams(*binds)
        # Sent as one query, the two statements are one transaction.
        self.no_disk_wait = text(f"SET LOCAL synchronous_commit TO OFF; {sql}").bindparams(*binds)

    def run(self, engine: Engine, params: Mapping[str, Any]) -> list[Row[Any]]:
        """Execute and commit; the rows it returns, if any."""
        statement = self.no_disk_wait if engine.dialect.name == "postgresql" else self.plain
        with autocommit(engine) as connection:
            result = connection.execute(statement, params)
            return list(result) if result.returns_rows else []


_CLAIM = Standalone(
    f"UPDATE jobs SET state = '{State.RUNNING}', attempts = attempts + 1, started_at = :now,"
    " worker = :worker, error = NULL"
    f" WHERE id = :id AND state IN ('{State.QUEUED}', '{State.RETRYING}')"
    " RETURNING attempts, max_attempts",
    bindparam("now", type_=UtcDateTime),
)
_MARK_PUBLISHED = Standalone(
    "UPDATE jobs SET published_at = :now WHERE id IN :ids AND published_at IS NULL",
    bindparam("now", type_=UtcDateTime),
    bindparam("ids", expanding=True),
)


def claim(engine: Engine, job_id: str, worker: str) -> Claim:
    """Move the job to ``running`` if it is ``queued`` or ``retrying``, committed
    at once (see :class:`Standalone`), outside the task's transaction.

    A job that is running elsewhere, finished or cancelled is left alone.
    """
    rows = _CLAIM.run(engine, {"id": job_id, "worker": worker, "now": utcnow()})
    if rows:
        return Claim(True, State.RUNNING, rows[0].attempts, rows[0].max_attempts)
    with engine.connect() as connection:
        return Claim(False, connection.scalar(select(JOBS.c.state).where(JOBS.c.id == job_id)))


def mark_published(bind: Engine | Connection, job_ids: Sequence[str]) -> None:
    """Record that the broker took these jobs' messages: in the connection's
    transaction, or given an engine, on its own (see :class:`Standalone`)."""
    params = {"ids": list(job_ids), "now": utcnow()}
    if isinstance(bind, Connection):
        bind.execute(_MARK_PUBLISHED.plain, params)
    else:
        _MARK_PUBLISHED.run(bind, params)


_SUCCEED = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("job_id"))
    .values(
        state=str(State.SUCCEEDED),
        finished_at=bindparam("now"),
        result=bindparam("result"),
        progress=None,
    )
)
"""Built once: building an UPDATE costs more Python than running it."""


def succeed(session: Session, job_id: str, result: Any) -> None:
    """Mark the job succeeded, in the caller's (the task's) transaction."""
    session.connection().execute(
        _SUCCEED, {"job_id": job_id, "now": utcnow(), "result": jsonable(result)}
    )


def enqueue(session: Session, row: Mapping[str, Any]) -> None:
    """Write a new ``queued`` job's row at once on ``session``'s connection, in
    its transaction (the ORM's unit of work would cost more than the INSERT)."""
    session.connection(bind_arguments={"mapper": Job}).execute(
        _INSERT_JOB, {**row, "state": str(State.QUEUED), "attempts": 0}
    )


_INSERT_JOB = insert(JOBS)


def set_progress(engine: Engine, job_id: str, progress: float) -> None:
    """Record progress (0 to 100) in a transaction of its own, visible at once."""
    with session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == State.RUNNING)
            .values(progress=progress)
        )


def patient(write: F) -> F:
    """Make a ledger write try again while the database is unreachable (for up
    to :data:`PATIENCE` seconds): a brief outage must not leave a job
    ``running`` for good. The writes it wraps are safe to repeat."""

    @functools.wraps(write)
    def patiently(*args: Any, **kwargs: Any) -> Any:
        tries, deadline = 0, time.monotonic() + PATIENCE
        while True:
            try:
                return write(*args, **kwargs)
            except Exception as exc:
                delay = backoff(tries, base=0.2, cap=5.0, jitter=False)
                if exc not in TRANSIENT_ERRORS or time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "ledger: %s failed (%s); again in %.1f s", write.__name__, exc, delay
                )
                time.sleep(delay)
                tries += 1

    return patiently  # type: ignore[return-value]


@patient
def retrying(engine: Engine, job_id: str, error: str, available_at: datetime) -> None:
    """Mark a running job to run again from ``available_at``; the caller publishes."""
    with session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == State.RUNNING)
            .values(
                state=State.RETRYING,
                error=_clip(error),
                available_at=available_at,
                published_at=None,
                worker=None,
            )
        )


@patient
def worker_lost(engine: Engine, job_id: str, error: str, worker: str | None = None) -> State | None:
    """The worker running the job died: back to ``retrying`` (its message is
    requeued), or ``failed`` if that was its last attempt. Given ``worker``
    (``hostname:pid``, as :func:`claim` records it), only if that process was
    the one running it: a duplicate delivery lost elsewhere leaves the run in
    progress alone. Returns the new state, or None if nothing changed."""
    final = Job.attempts >= Job.max_attempts
    owner = () if worker is None else (Job.worker == worker,)
    with session_scope(engine) as session:
        state = session.scalar(
            update(Job)
            .where(Job.id == job_id, Job.state == State.RUNNING, *owner)
            .values(
                state=case((final, State.FAILED), else_=State.RETRYING),
                finished_at=case((final, utcnow()), else_=None),
                error=_clip(f"the worker running it was lost: {error}"),
                worker=None,
            )
            .returning(Job.state)
        )
    return State(state) if state else None


@patient
def record_failure(
    engine: Engine,
    *,
    job_id: str,
    name: str,
    error: str,
    traceback: str | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    attempts: int = 1,
) -> None:
    """End a job as ``failed``, creating its row if it has none (a task sent
    with plain ``delay()``, or a message that could not be run)."""
    values = {
        "state": State.FAILED,
        "error": _clip(error),
        "traceback": _clip(traceback),
        "finished_at": utcnow(),
        "worker": None,
    }
    with session_scope(engine) as session:
        done = session.execute(
            update(Job).where(Job.id == job_id, Job.state.not_in(FINISHED)).values(**values)
        )
        if getattr(done, "rowcount", 0) == 0 and session.get(Job, job_id) is None:
            session.add(
                Job(
                    id=job_id,
                    name=name,
                    args=jsonable(list(args)),
                    kwargs=jsonable(dict(kwargs or {})),
                    options=jsonable(dict(options or {})),
                    attempts=attempts,
                    max_attempts=attempts,
                    published_at=utcnow(),
                    **values,
                )
            )


def requeue(session: Session, job_id: str) -> bool:
    """Queue a failed job again in ``session``'s transaction, with a fresh budget
    of attempts (the caller publishes it after the commit). False if it is not failed."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == State.FAILED)
        .values(
            state=State.QUEUED,
            max_attempts=Job.attempts + Job.max_attempts,
            available_at=utcnow(),
            published_at=None,
            finished_at=None,
            worker=None,
        )
        .execution_options(synchronize_session=False)
    )
    return getattr(done, "rowcount", 0) == 1


def cancel(session: Session, job_id: str) -> bool:
    """Cancel a job that has not started, in ``session``'s transaction: it will
    never run. False if it is not waiting."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(CLAIMABLE))
        .values(state=State.CANCELLED, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return getattr(done, "rowcount", 0) == 1


def resend(session: Session, job_ids: Sequence[str], published_before: datetime) -> None:
    """Owe the broker these waiting jobs again (the broker lost them): the
    relay publishes them next."""
    session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids),
            Job.state.in_(CLAIMABLE),
            Job.published_at < published_before,
        )
        .values(published_at=None)
    )


def abandon(session: Session, job_ids: Sequence[str]) -> None:
    """These running jobs' workers are gone: back to ``retrying``, owed to the broker."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state == State.RUNNING)
        .values(
            state=State.RETRYING,
            published_at=None,
            worker=None,
            error="the worker running it stopped answering",
        )
    )


def prune(session: Session, finished_before: datetime) -> int:
    """Delete the jobs that finished before ``finished_before``; how many."""
    result = session.execute(
        delete(Job).where(Job.state.in_(FINISHED), Job.finished_at < finished_before)
    )
    return int(getattr(result, "rowcount", 0) or 0)
