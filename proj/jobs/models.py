"""The ledger's tables: ``jobs`` (one row per job) and ``job_attempts`` (each
attempt that ended in an error), on a declarative base of their own.

Only :mod:`proj.jobs.ledger` changes them.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import JSON, Float, Index, Integer, MetaData, String, Table, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from proj.jobs.clock import UtcDateTime, utcnow


class State(StrEnum):
    """Where a job stands: ``waiting`` (a canvas step, for the jobs before it
    to succeed), ``queued`` (waiting for its first run), ``running``,
    ``retrying`` (waiting for its next attempt), then ``succeeded``, ``failed``
    or ``cancelled``, which are final."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


CLAIMABLE = (State.QUEUED, State.RETRYING)
NOT_STARTED = (State.WAITING, *CLAIMABLE)
"""Waiting for its run (or its next attempt): cancelled at once when asked."""
FINISHED = (State.SUCCEEDED, State.FAILED, State.CANCELLED)
MAX_PRIORITY = 9
"""The highest priority a job keeps (Celery's range on Redis, and the
``x-max-priority`` of the reference application's RabbitMQ queues)."""
TEXT_LIMIT = 20_000
"""Characters of an error, traceback or undecodable body kept in a row."""


def clip(value: str | None) -> str | None:
    """``value`` cut to :data:`TEXT_LIMIT` characters."""
    return value if value is None or len(value) <= TEXT_LIMIT else value[:TEXT_LIMIT] + "…"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON (anything else as its repr)."""
    return json.loads(json.dumps(value, default=repr))


OWED = "published_at IS NULL AND state IN ('queued', 'retrying')"
"""A job whose message the relay owes the broker (when it falls due)."""
ENDED = "finished_at IS NOT NULL"
"""A job that has finished (the only rows its end time's index holds)."""
UNIQUE_WHILE = "unique_key IS NOT NULL AND state IN ('queued', 'retrying', 'running')"
"""While a job holds its unique key: from enqueue until it finishes."""
KEYED = "concurrency_key IS NOT NULL"
"""A job with a concurrency limit (:mod:`proj.jobs.concurrency`)."""
TENANT_LEDGER_TABLES = ("jobs", "job_attempts")
"""The ledger's tables that row-level security keeps to a tenant, on
PostgreSQL (a job's, and its attempts'; see :mod:`proj.jobs.context`)."""
RATED = "rate_key IS NOT NULL"
"""A job with a shared rate limit (:mod:`proj.jobs.rates`)."""
TENANT_OR_NONE = text("coalesce(tenant, '')")
"""A job's tenant in the unique index (no tenant is one tenant of its own)."""

NAMING_CONVENTION = {
    # Constraint and index names Alembic can find again on every database.
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""The ledger's constraint and index naming convention (SQLAlchemy's
``MetaData(naming_convention=...)``), which an application may use for its own."""


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


class LedgerBase(DeclarativeBase):
    """The ledger's own declarative base: its table is not in the application's
    metadata (the application's migrations never see it)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(LedgerBase):
    """A job: what to run, where it stands, and how it ended."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_created_at", "state", "created_at"),
        # The lists filtered by tenant, task or queue, a state at a time,
        # newest first (proj.jobs.listing); the jobs finished lately.
        Index("ix_jobs_tenant_state_created_at", "tenant", "state", "created_at", "id"),
        Index("ix_jobs_name_state_created_at", "name", "state", "created_at", "id"),
        Index("ix_jobs_queue_state_created_at", "queue", "state", "created_at", "id"),
        Index(
            "ix_jobs_finished_at",
            "finished_at",
            postgresql_where=text(ENDED),
            sqlite_where=text(ENDED),
        ),
        # Only the waiting rows the relay still has to publish, by priority
        # and due time.
        Index(
            "ix_jobs_owed",
            "priority",
            "available_at",
            postgresql_where=text(OWED),
            sqlite_where=text(OWED),
        ),
        # The keyed jobs, by key and state (what runs of a key, see
        # proj.jobs.concurrency).
        Index(
            "ix_jobs_concurrency_key",
            "concurrency_key",
            "state",
            postgresql_where=text(KEYED),
            sqlite_where=text(KEYED),
        ),
        # The rate-limited jobs, by key and state (what a key's window has
        # room for, see proj.jobs.rates).
        Index(
            "ix_jobs_rate_key",
            "rate_key",
            "state",
            postgresql_where=text(RATED),
            sqlite_where=text(RATED),
        ),
        # One waiting or running job a task, tenant and unique key (see
        # ``unique=``); no tenant is one tenant of its own.
        Index(
            "uq_jobs_name_tenant_unique_key",
            "name",
            TENANT_OR_NONE,
            "unique_key",
            unique=True,
            postgresql_where=text(UNIQUE_WHILE),
            sqlite_where=text(UNIQUE_WHILE),
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
    """When the job may start (its countdown or ETA, or its next attempt's
    backoff): the relay publishes it then."""
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
    unique_key: Mapped[str | None] = mapped_column(String(255))
    """While the job waits or runs, no other job of its task has this key."""
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    """When someone asked the running job to stop (it sees it at its next check)."""
    context: Mapped[Any | None] = mapped_column(JSON)
    """What it carries from where it was enqueued (:mod:`proj.jobs.context`)."""
    tenant: Mapped[str | None] = mapped_column(String(64))
    """Whose job it is (the context's tenant), for filtering."""
    canvas_id: Mapped[str | None] = mapped_column(String(255), index=True)
    """The canvas (chain, group, chord) the job is a step of."""
    parents_left: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """The jobs before it that have not succeeded yet, while it is ``waiting``."""
    graph: Mapped[Any | None] = mapped_column(JSON)
    """Its place in its canvas (:class:`proj.jobs.canvas.Step`'s fields)."""
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Its Celery priority (its own, else its task's, else
    ``task_default_priority``; none is 0), from 0 to :data:`MAX_PRIORITY`:
    the relay publishes the jobs the broker would deliver first first."""
    concurrency_key: Mapped[str | None] = mapped_column(String(255))
    """At most ``concurrency_limit`` jobs with this key run at once
    (:mod:`proj.jobs.concurrency`; None: no limit)."""
    concurrency_limit: Mapped[int | None] = mapped_column(Integer)
    rate_key: Mapped[str | None] = mapped_column(String(255))
    """At most ``rate_limit`` jobs with this key start in any ``rate_period``
    seconds (:mod:`proj.jobs.rates`; None: no shared rate)."""
    rate_limit: Mapped[int | None] = mapped_column(Integer)
    rate_period: Mapped[float | None] = mapped_column(Float)
    queue: Mapped[str | None] = mapped_column(String(255))
    """The queue its message goes to, as Celery's routes chose it when it was
    enqueued (None for a row written before proj kept it): a paused queue's
    jobs are held (:mod:`proj.jobs.queues`)."""

    def to_json(self) -> dict[str, Any]:
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
            "due_at": iso(self.available_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "cancel_requested_at": iso(self.cancel_requested_at),
            "tenant": self.tenant,
            "queue": self.queue,
            "priority": self.priority,
            "canvas_id": self.canvas_id,
            "parents": (self.graph or {}).get("parents", []),
            "children": (self.graph or {}).get("children", []),
            "error_callbacks": (self.graph or {}).get("errbacks", []),
        }


JOBS = cast(Table, Job.__table__)


class JobAttempt(LedgerBase):
    """An attempt of a job that ended in an error: retried, failed, or lost
    with its worker. A job's successful attempt is its own row's."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(255), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    """The state the attempt left the job in: ``retrying`` or ``failed``."""
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "outcome": self.outcome,
            "error": self.error,
            "traceback": self.traceback,
            "worker": self.worker,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


ATTEMPTS = cast(Table, JobAttempt.__table__)


class WorkerBeat(LedgerBase):
    """A worker's last heartbeat (see :mod:`proj.jobs.heartbeat`)."""

    __tablename__ = "job_workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    """The worker's node name (``celery@host``), as its jobs' ``worker`` begins."""
    pid: Mapped[int] = mapped_column(Integer)
    """Its main process."""
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    """When this incarnation began: a job it claimed earlier was another's."""
    beat_at: Mapped[datetime] = mapped_column(UtcDateTime)


WORKERS = cast(Table, WorkerBeat.__table__)


class QueuePause(LedgerBase):
    """A paused queue: its jobs are neither published nor run until it is
    resumed (see :mod:`proj.jobs.queues`)."""

    __tablename__ = "job_queue_pauses"

    queue: Mapped[str] = mapped_column(String(255), primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    paused_by: Mapped[str] = mapped_column(String(400))
    """Who paused it, as the audit trail names actors (``token:<name>``, ``cli``…)."""

    def to_json(self) -> dict[str, Any]:
        return {"queue": self.queue, "paused_at": iso(self.paused_at), "paused_by": self.paused_by}


PAUSES = cast(Table, QueuePause.__table__)


class RateStart(LedgerBase):
    """A start of a job with a shared rate limit, kept while it counts
    against its key's rate (see :mod:`proj.jobs.rates`)."""

    __tablename__ = "job_rate_starts"
    __table_args__ = (Index("ix_job_rate_starts_key_until", "key", "until"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    until: Mapped[datetime] = mapped_column(UtcDateTime)
    """When it leaves its key's window (its start, plus the rate's period)."""


RATE_STARTS = cast(Table, RateStart.__table__)
