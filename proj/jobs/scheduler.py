"""A beat scheduler that sends each periodic run once per schedule slot, however
many ``celery beat`` processes are running (``Jobs`` makes it the app's
``beat_scheduler`` unless the app names another).

Each run becomes a ledger job whose id is derived from the entry (its name in
the schedule, and its task) and its slot (the period it falls in), so a
second beat's copy of the same run finds the job already there and sends
nothing, while two entries for one task (other arguments, say) each run.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from celery.beat import PersistentScheduler, ScheduleEntry
from celery.result import AsyncResult
from celery.schedules import schedule as interval
from sqlalchemy.exc import IntegrityError

from proj.jobs.outbox import enqueue
from proj.jobs.registry import jobs_of
from proj.jobs.retry import max_attempts_of

logger = logging.getLogger(__name__)

SLOTS = uuid.UUID("6f1d7a52-3b1e-4f6e-9a57-2f1c0d7b9e11")


def slot_of(entry: ScheduleEntry, now: datetime) -> int:
    """The slot ``now`` falls in for ``entry``: its period number for an
    interval schedule, the minute for any other (crontab runs at most once a minute)."""
    period = 60.0
    every = getattr(entry.schedule, "run_every", None)
    if isinstance(entry.schedule, interval) and every is not None:
        period = max(every.total_seconds(), 1.0)
    return int(now.timestamp() // period)


def slot_job_id(entry: ScheduleEntry, now: datetime) -> str:
    """The job id of ``entry``'s run in the slot ``now`` falls in."""
    return str(uuid.uuid5(SLOTS, f"{entry.name}:{entry.task}@{slot_of(entry, now)}"))


class SlotScheduler(PersistentScheduler):
    """Celery's persistent scheduler, sending each slot's run through the ledger."""

    def apply_async(
        self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> AsyncResult[Any] | None:
        if advance:
            entry = self.reserve(entry)  # type: ignore[assignment]
        job_id = slot_job_id(entry, self.app.now())
        jobs = jobs_of(self.app)
        task = self.app.tasks.get(str(entry.task))
        default = jobs.settings.max_attempts
        try:
            with jobs.session_scope() as session:
                enqueue(
                    session,
                    jobs,
                    str(entry.task),
                    list(entry.args or ()),
                    dict(entry.kwargs or {}),
                    max_attempts=max_attempts_of(task, default) if task else default,
                    options={**(entry.options or {}), "task_id": job_id},
                )
        except IntegrityError:
            logger.info("beat: %s for this slot was sent already (job %s)", entry.task, job_id)
            return None
        return AsyncResult(job_id, app=self.app)
