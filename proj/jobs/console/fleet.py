"""The workers page's rows: each worker's last heartbeat (``job_workers``,
see :mod:`proj.jobs.heartbeat`), whether it is alive, and the jobs the
ledger says it runs.

A worker is alive while its last heartbeat is at most ``stale_after``
seconds old (after that the reconciler takes its jobs back). A running job
belongs to the worker its ``worker`` column names (``celery@host:pid``:
the node before the last colon); running jobs whose worker has no heartbeat
row (heartbeats off, or a worker that stopped) are listed apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from proj.jobs.clock import utcnow
from proj.jobs.models import Job, State, WorkerBeat
from proj.jobs.reconciler import node_of


@dataclass(frozen=True)
class RunningJob:
    """A job the ledger says is running."""

    id: str
    name: str
    worker: str | None
    """``celery@host:pid`` of the process running it."""
    started_at: datetime | None


@dataclass(frozen=True)
class WorkerRow:
    """A worker that beats, as the workers page shows it."""

    hostname: str
    pid: int
    started_at: datetime
    beat_at: datetime
    alive: bool
    jobs: Sequence[RunningJob]


@dataclass(frozen=True)
class Fleet:
    """What the workers page shows."""

    workers: Sequence[WorkerRow]
    unbeating: Sequence[RunningJob]
    """Running jobs whose worker has no heartbeat row."""


def fleet(session: Session, stale_after: float, now: datetime | None = None) -> Fleet:
    """The workers and their running jobs, read in ``session``."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after)
    running: dict[str, list[RunningJob]] = {}
    for row in session.execute(
        select(Job.id, Job.name, Job.worker, Job.started_at)
        .where(Job.state == State.RUNNING)
        .order_by(Job.started_at, Job.id)
    ):
        job = RunningJob(row.id, row.name, row.worker, row.started_at)
        running.setdefault(node_of(job.worker), []).append(job)
    workers = [
        WorkerRow(
            hostname=beat.hostname,
            pid=beat.pid,
            started_at=beat.started_at,
            beat_at=beat.beat_at,
            alive=beat.beat_at >= cutoff,
            jobs=running.pop(beat.hostname, []),
        )
        for beat in session.scalars(select(WorkerBeat).order_by(WorkerBeat.hostname))
    ]
    unbeating = [job for node in sorted(running) for job in running[node]]
    return Fleet(workers, unbeating)
