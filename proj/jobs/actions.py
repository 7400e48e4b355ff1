"""What an operator may do to jobs: retry a failed one, cancel a waiting or
running one; one at a time (the job API, the console's job page) or many
(the console's bulk actions).

Every change is a compare-and-set in the ledger, in the caller's session's
transaction (the caller commits; a retried job is published after the
commit): a job whose state moved on since it was looked at is left alone.
One job at a time, such a job raises :class:`NotActionable`; many at a time,
it is counted in the :class:`Tally`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Text, cast, select
from sqlalchemy.orm import Session, load_only

from proj.jobs import ledger, outbox
from proj.jobs.deadletter import UNRUNNABLE
from proj.jobs.errors import ProjError
from proj.jobs.ledger import MESSAGE_FIELDS
from proj.jobs.models import NOT_STARTED, Job, State

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs

CANCELLABLE = (*NOT_STARTED, State.RUNNING)
"""The states a job may be cancelled in."""
CHUNK = 500
"""Jobs looked up in one query by :func:`retry_each`."""


class NotActionable(ProjError):
    """The job is not in a state this action applies to; look at it again."""


def may_retry(job: Job) -> bool:
    """True when ``job`` is failed and a worker could run it again."""
    return job.state == State.FAILED and not (job.options or {}).get(UNRUNNABLE)


def may_cancel(job: Job) -> bool:
    """True when ``job`` waits or runs."""
    return job.state in CANCELLABLE


def retryable() -> tuple[ColumnElement[bool], ...]:
    """The SQL conditions of :func:`may_retry`, to count or pick jobs with."""
    # The key is looked for in the text: PostgreSQL's json operators refuse a
    # document holding \u0000, which an unreadable message's body may.
    unrunnable = cast(Job.options, Text).contains(f'"{UNRUNNABLE}"', autoescape=True)
    return (Job.state == State.FAILED, ~unrunnable)


def cancellable() -> tuple[ColumnElement[bool], ...]:
    """The SQL condition of :func:`may_cancel`."""
    return (Job.state.in_(CANCELLABLE),)


def retry(session: Session, jobs: Jobs, job: Job) -> None:
    """Queue the failed ``job`` again, with a fresh budget of attempts; its
    message is published once ``session``'s transaction commits.

    Raises :class:`NotActionable` (nothing changed) if it is not failed, if
    it is a message no worker could read, or if it stopped being failed
    since ``job`` was loaded.
    """
    if job.state != State.FAILED:
        raise NotActionable(f"job {job.id} is {job.state}; only a failed job is retried")
    if (job.options or {}).get(UNRUNNABLE):
        raise NotActionable(f"job {job.id} is a message no worker could read")
    if not outbox.requeue(session, jobs, job):
        raise NotActionable(f"job {job.id} changed state; look again")


def cancel(session: Session, job: Job) -> State:
    """Cancel ``job``: a waiting one at once (it will never run), a running one
    is asked to stop (it ends ``cancelled`` at its next check). Returns the
    state it was in. Raises :class:`NotActionable` (nothing changed) if it
    has finished."""
    was = ledger.cancel(session, job.id)
    if was is None:
        raise NotActionable(
            f"job {job.id} is {job.state}; only a waiting or running job is cancelled"
        )
    return was


@dataclass
class Tally:
    """What an action on many jobs did."""

    done: int = 0
    """Jobs retried, or cancelled at once."""
    changed: list[str] = field(default_factory=list)
    """The ids of the jobs retried, cancelled or asked to stop."""
    cancelled: list[str] = field(default_factory=list)
    """The ids of the jobs cancelled at once (cancel only)."""
    stopping: int = 0
    """Running jobs asked to stop (cancel only)."""
    skipped: int = 0
    """Jobs no longer (or never) in a state the action applies to, or gone."""
    unrunnable: int = 0
    """Failed jobs that are messages no worker could read (retry only)."""


def retry_each(session: Session, jobs: Jobs, job_ids: Sequence[str]) -> Tally:
    """:func:`retry` each of ``job_ids`` that can be, in ``session``'s
    transaction; the others are counted, never raised."""
    tally = Tally()
    for chunk in _chunks(job_ids):
        query = (
            select(Job)
            .options(load_only(*(getattr(Job, f) for f in (*MESSAGE_FIELDS, "state"))))
            .where(Job.id.in_(chunk))
        )
        found = {job.id: job for job in session.scalars(query)}
        for job_id in chunk:
            job = found.get(job_id)
            if job is None or job.state != State.FAILED:
                tally.skipped += 1
            elif not may_retry(job):
                tally.unrunnable += 1
            elif outbox.requeue(session, jobs, job):
                tally.done += 1
                tally.changed.append(job_id)
            else:
                tally.skipped += 1  # it stopped being failed since the look-up
        for job in found.values():
            # Their messages are made; thousands of rows need not stay in memory.
            session.expunge(job)
    return tally


def cancel_each(session: Session, job_ids: Iterable[str]) -> Tally:
    """:func:`cancel` each of ``job_ids`` that waits or runs, in ``session``'s
    transaction; the others are counted, never raised."""
    tally = Tally()
    for job_id in job_ids:
        was = ledger.cancel(session, job_id)
        if was is None:
            tally.skipped += 1
            continue
        tally.changed.append(job_id)
        if was == State.RUNNING:
            tally.stopping += 1
        else:
            tally.done += 1
            tally.cancelled.append(job_id)
    return tally


def _chunks(job_ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(job_ids), CHUNK):
        yield job_ids[start : start + CHUNK]
