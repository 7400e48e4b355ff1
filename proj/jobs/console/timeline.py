"""A job's timeline, from its ledger row and its attempts: created, due,
published, each attempt started and how it ended, cancel requested, finished."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from proj.jobs.models import Job, JobAttempt, State

SAME_MOMENT = timedelta(seconds=1)
"""A job due within this of its creation was due at once (no ETA to show)."""


@dataclass(frozen=True)
class Moment:
    """One thing that happened to a job."""

    at: datetime
    what: str
    state: str | None = None
    """The state it left the job in, where that is worth a badge."""
    detail: str | None = None


def timeline(job: Job, attempts: Sequence[JobAttempt]) -> list[Moment]:
    """What happened to ``job``, oldest first. ``attempts`` are its attempts
    that ended in an error (:func:`proj.jobs.ledger.attempts_of`); the row
    keeps only the latest publication and start."""
    found = [Moment(job.created_at, "created", State.QUEUED)]
    due = _due(job, attempts)
    if due is not None:
        found.append(due)
    if job.published_at is not None:
        found.append(Moment(job.published_at, "published to the broker"))
    recorded = set()
    for attempt in attempts:
        recorded.add(attempt.attempt)
        if attempt.started_at is not None:
            found.append(_started(attempt.attempt, attempt.started_at, attempt.worker))
        found.append(
            Moment(
                attempt.finished_at,
                f"attempt {attempt.attempt} ended in an error",
                attempt.outcome,
                _first_line(attempt.error),
            )
        )
    if job.started_at is not None and job.attempts not in recorded:
        found.append(_started(job.attempts, job.started_at, job.worker))
    if job.cancel_requested_at is not None:
        found.append(Moment(job.cancel_requested_at, "asked to stop"))
    found.sort(key=lambda moment: moment.at)
    if job.finished_at is not None:
        # Last, whatever the clock says: its last attempt's row is written
        # in the same transaction, a moment later.
        found.append(Moment(job.finished_at, "finished", job.state))
    return found


def _due(job: Job, attempts: Sequence[JobAttempt]) -> Moment | None:
    """When the job may start, where that says something: its ETA, the
    back-off before its next attempt, or when it was queued again."""
    if job.available_at is None or job.available_at - job.created_at < SAME_MOMENT:
        return None
    if job.attempts == 0 and not attempts:
        return Moment(job.available_at, "due (its ETA)")
    if job.state == State.RETRYING:
        return Moment(job.available_at, "next attempt due", State.RETRYING)
    if job.state == State.QUEUED:
        return Moment(job.available_at, "queued again", State.QUEUED)
    return None


def _started(number: int, at: datetime, worker: str | None) -> Moment:
    return Moment(
        at, f"attempt {number} started", State.RUNNING, f"on {worker}" if worker else None
    )


def _first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0] if text and text.strip() else None
