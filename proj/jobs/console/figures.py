"""The overview's figures, all from the ledger: jobs by state and by queue,
jobs finished per minute over the last hour, what the relay owes the broker,
and the failure rate.

Each query stays bounded on a ledger of millions of rows. Waiting and
running jobs are found through the ``(state, created_at)`` index, and
counted up to :data:`COUNT_CAP` a state (a backlog of a million waiting jobs
is shown as "10,000+", in the time 10,000 take); finished ones are counted
for the last hour only, through the index on ``finished_at``. Owed rows come
from the relay's partial index, counted up to the same cap.
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

from proj.jobs import publisher
from proj.jobs.clock import utcnow
from proj.jobs.console.filters import Queues, named_queue
from proj.jobs.models import CLAIMABLE, FINISHED, Job, State

WINDOW_MINUTES = 60
"""Minutes the finished figures and the chart cover, the current one included."""
ACTIVE = (State.QUEUED, State.RUNNING, State.RETRYING)
COUNT_CAP = 10_000
"""Jobs of a waiting or running state, and owed jobs, the overview counts at
most; past it a figure is shown as at least this many."""
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
    """Jobs due to run whose message the broker has not confirmed yet."""
    oldest_owed: datetime | None
    """When the earliest of those that the relay should have sent fell due
    (see :func:`relay_debt`)."""
    cap: int = COUNT_CAP
    """Jobs of a waiting or running state, and owed jobs, counted at most
    (:data:`COUNT_CAP`): one more than this is counted when there are more."""

    @property
    def by_state(self) -> dict[str, int]:
        """State → jobs, every state present (see :attr:`by_queue`)."""
        counts = Counter({str(state): 0 for state in State})
        for states in self.by_queue.values():
            counts.update(states)
        return dict(counts)

    @property
    def capped(self) -> list[str]:
        """The waiting or running states with more jobs than :attr:`cap` (their
        figures, by queue too, are of the first ``cap + 1`` found)."""
        by_state = self.by_state
        return [str(state) for state in ACTIVE if by_state[state] > self.cap]

    @property
    def owed_capped(self) -> bool:
        """Whether more jobs are owed than :attr:`cap`."""
        return self.owed > self.cap

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
        """How long the earliest owed job has been due (None: none is)."""
        return None if self.oldest_owed is None else max(self.at - self.oldest_owed, timedelta())


def overview(session: Session, celery_app: Celery, at: datetime | None = None) -> Overview:
    """The overview's figures at ``at`` (default: now), read in ``session``."""
    at = at or utcnow()
    cap = COUNT_CAP  # read at each call: a test lowers it
    since = at.replace(second=0, microsecond=0) - timedelta(minutes=WINDOW_MINUTES - 1)
    finished = (Job.finished_at >= since, Job.state.in_(FINISHED))
    by_queue: dict[str, Counter[str]] = {}
    queues = Queues(celery_app)
    counted = [
        row
        for active in ACTIVE  # a capped count a state, each through its index range
        for row in _by_queue_and_state(session, queues, Job.state == active, cap=cap)
    ]
    counted += _by_queue_and_state(session, queues, *finished)
    for queue, state, count in counted:
        by_queue.setdefault(queue, Counter())[state] += count
    owed, oldest = relay_debt(session, at, cap)
    return Overview(
        at=at,
        since=since,
        by_queue={queue: dict(by_queue[queue]) for queue in sorted(by_queue)},
        per_minute=_per_minute(session, since, finished),
        owed=owed,
        oldest_owed=oldest,
        cap=cap,
    )


def relay_debt(
    session: Session, at: datetime, cap: int | None = None
) -> tuple[int, datetime | None]:
    """The jobs due by ``at`` whose message the broker lacks (at most ``cap``
    + 1 of them counted), and when the earliest the relay should have sent
    by now fell due: of those in a queue not paused, with no concurrency or
    rate key (the relay holds those back on purpose). A job due later (a
    countdown) is owed nothing yet."""
    due = select(Job.id).where(*publisher.owed(), Job.available_at <= at)
    if cap is not None:
        due = due.limit(cap + 1)
    owed = session.scalar(select(func.count()).select_from(due.subquery())) or 0
    oldest = publisher.next_due(session.connection()) if owed else None
    return int(owed), oldest if oldest is not None and oldest <= at else None


def _by_queue_and_state(
    session: Session, queues: Queues, *conditions: ColumnElement[bool], cap: int | None = None
) -> list[tuple[str, str, int]]:
    """Queue, state and jobs of the jobs meeting ``conditions`` (with ``cap``,
    of the first ``cap + 1`` of them only)."""
    some = select(Job.name, named_queue().label("queue"), Job.state).where(*conditions)
    if cap is not None:
        some = some.limit(cap + 1)
    found = some.subquery()
    rows = session.execute(
        select(found.c.name, found.c.queue, found.c.state, func.count()).group_by(
            found.c.name, found.c.queue, found.c.state
        )
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
