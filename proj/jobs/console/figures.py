"""The overview's figures, all from the ledger: jobs by state and by queue,
jobs finished per minute over the last hour, what the relay owes the broker,
and the failure rate.

Each query stays bounded on a ledger of millions of rows. Waiting and
running jobs are few, and found through the ``(state, created_at)`` index;
finished ones are counted for the last hour only, through the index on
``finished_at``. Owed rows come from the relay's partial index.
Rows are grouped in the database by task name and the queue their row
names, and each pair's queue is worked out once, as the jobs list's queue
filter has it (:class:`~proj.jobs.console.filters.Queues`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import BigInteger, ColumnElement, Integer, cast, extract, func, select
from sqlalchemy.orm import Session

from proj.jobs.clock import utcnow
from proj.jobs.console.filters import Queues, named_queue
from proj.jobs.models import CLAIMABLE, FINISHED, Job, State

WINDOW_MINUTES = 60
"""Minutes the finished figures and the chart cover, the current one included."""
ACTIVE = (State.QUEUED, State.RUNNING, State.RETRYING)
OUTCOMES = (State.SUCCEEDED, State.FAILED, State.CANCELLED)


@dataclass(frozen=True)
class Overview:
    """The ledger as the overview shows it, at :attr:`at`."""

    at: datetime
    """When the ledger was read."""
    since: datetime
    """Where the last hour starts: the first of :data:`WINDOW_MINUTES` whole minutes."""
    by_queue: Mapping[str, Mapping[str, int]]
    """Queue → state → jobs: waiting and running ones now, finished ones since :attr:`since`."""
    per_minute: Sequence[tuple[datetime, Mapping[str, int]]]
    """Each minute since :attr:`since`, oldest first, with its jobs finished by outcome."""
    owed: int
    """Jobs waiting to run whose message the broker has not confirmed yet."""
    oldest_owed: datetime | None
    """When the oldest of those was created."""

    @property
    def by_state(self) -> dict[str, int]:
        """State → jobs, every state present (see :attr:`by_queue`)."""
        counts = Counter({str(state): 0 for state in State})
        for states in self.by_queue.values():
            counts.update(states)
        return dict(counts)

    @property
    def waiting(self) -> dict[str, int]:
        """Queue → jobs queued or retrying, for the queues that have any."""
        found = {
            queue: sum(states.get(state, 0) for state in CLAIMABLE)
            for queue, states in self.by_queue.items()
        }
        return {queue: count for queue, count in sorted(found.items()) if count}

    @property
    def finished(self) -> int:
        """Jobs finished since :attr:`since`, whatever their outcome."""
        by_state = self.by_state
        return sum(by_state[state] for state in OUTCOMES)

    @property
    def failure_rate(self) -> float | None:
        """Of the jobs finished since :attr:`since`, the part that failed (None: none finished)."""
        finished = self.finished
        return self.by_state[State.FAILED] / finished if finished else None

    @property
    def relay_lag(self) -> timedelta | None:
        """How long the oldest owed row has waited (None: nothing owed)."""
        return None if self.oldest_owed is None else max(self.at - self.oldest_owed, timedelta())


def overview(session: Session, celery_app: Celery, at: datetime | None = None) -> Overview:
    """The overview's figures at ``at`` (default: now), read in ``session``."""
    at = at or utcnow()
    since = at.replace(second=0, microsecond=0) - timedelta(minutes=WINDOW_MINUTES - 1)
    finished = (Job.finished_at >= since, Job.state.in_(FINISHED))
    by_queue: dict[str, Counter[str]] = {}
    queues = Queues(celery_app)
    for conditions in ((Job.state.in_(ACTIVE),), finished):
        for queue, state, count in _by_queue_and_state(session, queues, *conditions):
            by_queue.setdefault(queue, Counter())[state] += count
    owed, oldest = session.execute(
        select(func.count(), func.min(Job.created_at)).where(
            Job.published_at.is_(None), Job.state.in_(CLAIMABLE)
        )
    ).one()
    return Overview(
        at=at,
        since=since,
        by_queue={queue: dict(by_queue[queue]) for queue in sorted(by_queue)},
        per_minute=_per_minute(session, since, finished),
        owed=int(owed),
        oldest_owed=oldest,
    )


def _by_queue_and_state(
    session: Session, queues: Queues, *conditions: ColumnElement[bool]
) -> list[tuple[str, str, int]]:
    named = named_queue()
    rows = session.execute(
        select(Job.name, named, Job.state, func.count())
        .where(*conditions)
        .group_by(Job.name, named, Job.state)
    )
    return [(queues.of(name, queue), str(state), int(count)) for name, queue, state, count in rows]


def _per_minute(
    session: Session, since: datetime, finished: tuple[ColumnElement[bool], ...]
) -> list[tuple[datetime, dict[str, int]]]:
    minute = _minute_number(session, Job.finished_at)
    rows = session.execute(
        select(minute, Job.state, func.count()).where(*finished).group_by(minute, Job.state)
    )
    first = int(since.timestamp()) // 60
    columns: list[tuple[datetime, dict[str, int]]] = [
        (since + timedelta(minutes=n), {str(state): 0 for state in OUTCOMES})
        for n in range(WINDOW_MINUTES)
    ]
    for number, state, count in rows:
        # A finish stamped ahead of this clock (another host's) has no column yet.
        if 0 <= int(number) - first < WINDOW_MINUTES:
            columns[int(number) - first][1][str(state)] += int(count)
    return columns


def _minute_number(session: Session, column: Any) -> ColumnElement[int]:
    """SQL: the minutes from the Unix epoch to ``column``'s moment, rounded down."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(extract("epoch", column)), BigInteger) // 60
    # SQLite keeps UTC text, and its date functions round it to the
    # millisecond (xx:59.9996 would be the next minute): the fraction of a
    # second is cut off first.
    return cast(func.strftime("%s", func.substr(column, 1, 19)), Integer) // 60
