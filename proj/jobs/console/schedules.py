"""The periodic page's rows: each entry of the Celery app's ``beat_schedule``,
its schedule in words, the last run the ledger has of it, and its next run.

Beat's slot scheduler (:mod:`proj.jobs.scheduler`) sends each run as a job
whose id its entry and slot make, so an entry's runs are found by id: the
newest job among its last :data:`SLOTS_BACK` slots is its last run. The slots
of an interval are its periods; of a crontab, the minutes it fires at; of
any other schedule, the minutes of the last hour. A run beat sent late (it
was down when the crontab fired) falls in a minute the crontab does not
name, and is not found.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from itertools import islice
from typing import Any

from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import crontab, solar
from celery.schedules import schedule as interval
from sqlalchemy import select
from sqlalchemy.orm import Session

from proj.jobs.clock import utcnow
from proj.jobs.console.wording import duration
from proj.jobs.models import Job
from proj.jobs.scheduler import slot_job_id

SLOTS_BACK = 60
"""Slots of an entry searched for its last run."""
CRON_DAYS_BACK = 400
"""Days a crontab's firing minutes are searched back for."""


@dataclass(frozen=True)
class LastRun:
    """The newest job of an entry's recent slots."""

    id: str
    state: str
    created_at: datetime


@dataclass(frozen=True)
class PeriodicRow:
    """An entry of the beat schedule, as the periodic page shows it."""

    name: str
    task: str
    schedule: str
    """The schedule in words."""
    last: LastRun | None
    next_at: datetime | None
    """When it runs next: from its last run, or from now for a crontab (None:
    an interval with no run in the ledger, whose next run beat alone knows)."""
    due: bool
    """True when the next run's time has come (beat sends it at its next tick)."""


def entries(celery_app: Celery) -> list[ScheduleEntry]:
    """The app's beat schedule, by entry name."""
    schedule: dict[str, dict[str, Any]] = dict(celery_app.conf.beat_schedule or {})
    return [
        ScheduleEntry(**{**fields, "name": name, "app": celery_app})
        for name, fields in sorted(schedule.items())
    ]


def periodic_rows(
    session: Session, celery_app: Celery, now: datetime | None = None
) -> list[PeriodicRow]:
    """A row for each entry of ``celery_app``'s beat schedule, read in ``session``."""
    now = now or utcnow()
    return [_row(session, entry, now) for entry in entries(celery_app)]


def _row(session: Session, entry: ScheduleEntry, now: datetime) -> PeriodicRow:
    schedule: Any = entry.schedule
    ids = [slot_job_id(entry, moment) for moment in recent_slots(schedule, now)]
    found = session.execute(
        select(Job.id, Job.state, Job.created_at)
        .where(Job.id.in_(ids))
        .order_by(Job.created_at.desc())
        .limit(1)
    ).first()
    last = LastRun(found.id, found.state, found.created_at) if found else None
    next_at: datetime | None = None
    if not isinstance(schedule, interval):
        estimate = now + schedule.remaining_estimate(last.created_at if last else now)
        # The schedule reads its own clock, a moment after ``now``: to the second.
        next_at = (estimate + timedelta(microseconds=500_000)).replace(microsecond=0)
    elif last is not None:
        next_at = last.created_at + timedelta(seconds=schedule.seconds)
    return PeriodicRow(
        name=str(entry.name),
        task=str(entry.task),
        schedule=in_words(schedule),
        last=last,
        next_at=next_at,
        due=next_at is not None and next_at <= now,
    )


def recent_slots(schedule: Any, now: datetime) -> list[datetime]:
    """A moment in each of the last :data:`SLOTS_BACK` slots ``schedule`` fired
    in (or may have), newest first."""
    every = getattr(schedule, "run_every", None)
    if isinstance(schedule, interval) and every is not None:
        period = max(every, timedelta(seconds=1))
        return [now - period * n for n in range(SLOTS_BACK)]
    if isinstance(schedule, crontab):
        return list(islice(_firing_minutes(schedule, now), SLOTS_BACK))
    return [now - timedelta(minutes=n) for n in range(SLOTS_BACK)]


def _firing_minutes(cron: Any, now: datetime) -> Iterator[datetime]:
    """The minutes ``cron`` fired at up to ``now``, newest first (in its time zone)."""
    zone: Any = cron.tz
    local = now.astimezone(zone)
    hours, minutes = sorted(cron.hour, reverse=True), sorted(cron.minute, reverse=True)
    for back in range(CRON_DAYS_BACK):
        day = local.date() - timedelta(days=back)
        if not (
            day.month in cron.month_of_year
            and day.day in cron.day_of_month
            and day.isoweekday() % 7 in cron.day_of_week
        ):
            continue
        for hour in hours:
            for minute in minutes:
                moment = datetime.combine(day, time(hour, minute), tzinfo=zone)
                if moment <= local:
                    yield moment


def in_words(schedule: Any) -> str:
    """``every 5 min``, ``crontab 0 3 * * * (UTC)``, ``sunrise at (48.85, 2.35)``…"""
    if isinstance(schedule, interval):
        return f"every {duration(schedule.seconds)}"
    if isinstance(schedule, crontab):
        fields = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        spec = " ".join(str(getattr(schedule, f"_orig_{field}", "*")) for field in fields)
        return f"crontab {spec} ({schedule.tz})"
    if isinstance(schedule, solar):
        return f"{schedule.event} at ({schedule.lat}, {schedule.lon})"
    return str(schedule)
