"""``Jobs.prune``: finished jobs past the retention go, with their attempts,
in batches each committed on its own; nothing else goes."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import event, insert, select

from proj.jobs import Job, Jobs, State, utcnow
from proj.jobs import extension as installation
from proj.jobs.models import JobAttempt


def add_jobs(jobs: Jobs, count: int, state: State, finished_days_ago: float | None) -> list[str]:
    """``count`` jobs in ``state``, created a day before they finished, each
    with one attempt recorded."""
    now = utcnow()
    finished = None if finished_days_ago is None else now - timedelta(days=finished_days_ago)
    created = (finished or now) - timedelta(days=1)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with jobs.engine.begin() as connection:
        for job_id in ids:
            connection.execute(
                insert(Job).values(
                    id=job_id,
                    name="tests.prune.old",
                    args=[],
                    kwargs={},
                    options={},
                    state=state,
                    attempts=1,
                    max_attempts=1,
                    created_at=created,
                    available_at=created,
                    finished_at=finished,
                )
            )
            connection.execute(
                insert(JobAttempt).values(
                    job_id=job_id, attempt=1, outcome="succeeded", finished_at=finished or now
                )
            )
    return ids


def test_prune_deletes_old_finished_jobs_in_batches(
    celery_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 finished jobs past the retention go, with their attempts, in three
    transactions of at most 5; a recent finished job, an old job still
    queued and an old failed job do stay or go as their state says."""
    jobs = Jobs.of(celery_app)
    days = jobs.settings.retention_days
    old = add_jobs(jobs, 11, State.SUCCEEDED, days + 2) + add_jobs(jobs, 1, State.FAILED, days + 1)
    kept = add_jobs(jobs, 2, State.SUCCEEDED, days - 1) + add_jobs(jobs, 1, State.QUEUED, None)
    monkeypatch.setattr(installation, "PRUNE_BATCH", 5)
    commits: list[Any] = []
    count = commits.append
    event.listen(jobs.engine, "commit", count)
    try:
        deleted = jobs.prune()
    finally:
        event.remove(jobs.engine, "commit", count)

    assert deleted >= 12  # other tests' old jobs too, if any
    with jobs.engine.connect() as connection:
        mine = old + kept
        left = set(connection.scalars(select(Job.id).where(Job.id.in_(mine))))
        attempts = set(
            connection.scalars(select(JobAttempt.job_id).where(JobAttempt.job_id.in_(mine)))
        )
    assert left == attempts == set(kept)
    # The audit trail's transaction, then full batches of 5 and the last,
    # short one (empty when the full ones took them all).
    assert len(commits) == 1 + deleted // 5 + 1
