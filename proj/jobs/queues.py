"""Pausing a queue, durably: while it is paused (a row in
``job_queue_pauses``), the relay publishes none of its jobs, and a worker
that receives one it published before hands it back to the ledger without
running it or counting an attempt (:func:`proj.jobs.ledger.claim`). Resuming
deletes the row; the relay then publishes what waits, due time first.

A job's queue is its row's ``queue``: where Celery's routes sent it when it
was enqueued. The functions change the caller's session's transaction (the
caller commits, with its audit record); the job API, the console and
``proj jobs pause``/``resume`` call them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from proj.jobs.clock import utcnow
from proj.jobs.models import CLAIMABLE, PAUSES, Job, QueuePause, iso
from proj.jobs.relay import NOTIFY_CHANNEL

NAME_LIMIT = 255
"""Longest queue name (the column's)."""


class InvalidQueueName(ValueError):
    """A queue name no queue can have (empty, too long, or holding a NUL)."""


def checked(queue: str) -> str:
    """``queue`` as given, or :class:`InvalidQueueName` saying why it cannot name one."""
    if not queue.strip():
        raise InvalidQueueName("a queue's name cannot be empty")
    if len(queue) > NAME_LIMIT:
        raise InvalidQueueName(f"a queue's name takes at most {NAME_LIMIT} characters")
    if "\x00" in queue:
        raise InvalidQueueName("a queue's name cannot hold a NUL character")
    return queue


def pause(session: Session, queue: str, by: str) -> bool:
    """Pause ``queue`` in ``session``'s transaction, in the name of ``by``
    (an actor as the audit trail names them). False if it was paused already
    (who paused it and when stay as they were)."""
    values = {"queue": checked(queue), "paused_at": utcnow(), "paused_by": by}
    dialect = postgresql if session.connection().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(PAUSES).values(values).on_conflict_do_nothing()
    return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]


def resume(session: Session, queue: str) -> bool:
    """Resume ``queue`` in ``session``'s transaction; on PostgreSQL the relays
    are woken as it commits. False if it was not paused."""
    done = session.execute(delete(QueuePause).where(QueuePause.queue == checked(queue)))
    if not done.rowcount:  # type: ignore[attr-defined]
        return False
    if session.connection().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    return True


def paused(session: Session) -> list[QueuePause]:
    """The paused queues, by name."""
    return list(session.scalars(select(QueuePause).order_by(QueuePause.queue)))


@dataclass(frozen=True)
class QueueState:
    """A queue: whether it is paused, since when and by whom; how many jobs wait in it."""

    name: str
    paused_at: datetime | None = None
    """When it was paused (None: it is not)."""
    paused_by: str | None = None
    """Who paused it, as the audit trail names actors."""
    waiting: int = 0
    """Jobs ``queued`` or ``retrying`` in it (of those counted)."""

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "paused": self.paused,
            "paused_at": iso(self.paused_at),
            "paused_by": self.paused_by,
            "waiting": self.waiting,
        }


def listing(session: Session, *conditions: ColumnElement[bool]) -> list[QueueState]:
    """Each queue that is paused or has jobs waiting (of those matching
    ``conditions``; jobs whose queue is not known are left out), by name."""
    query = (
        select(Job.queue, func.count())
        .where(Job.state.in_(CLAIMABLE), Job.queue.is_not(None), *conditions)
        .group_by(Job.queue)
    )
    counts = {str(queue): int(count) for queue, count in session.execute(query).all()}
    return with_pauses(session, counts)


def with_pauses(session: Session, waiting: Mapping[str, int]) -> list[QueueState]:
    """Each queue that is paused or named in ``waiting`` (queue → jobs
    waiting in it, as the caller counted them), by name."""
    pauses = {pause.queue: pause for pause in paused(session)}
    return [
        _state(name, pauses.get(name), waiting.get(name, 0))
        for name in sorted(waiting.keys() | pauses.keys())
    ]


def state(session: Session, queue: str) -> QueueState:
    """Whether ``queue`` is paused (its ``waiting`` is not counted)."""
    return _state(queue, session.get(QueuePause, queue))


def _state(queue: str, pause: QueuePause | None, waiting: int = 0) -> QueueState:
    if pause is None:
        return QueueState(queue, waiting=waiting)
    return QueueState(queue, pause.paused_at, pause.paused_by, waiting)
