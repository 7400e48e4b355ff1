"""Two ``celery -A proj beat`` processes running by mistake, with a real worker:
each period's run of a periodic task still happens once (``proj.jobs.scheduler``'s
``SlotScheduler`` gives it a job id derived from its slot)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import schedule
from sqlalchemy import select
from subprocesses import Commands

from proj.db import session_scope
from proj.jobs import utcnow
from proj.jobs.models import Job, State
from proj.jobs.scheduler import slot_job_id, slot_of

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

TASK = "proj.tasks.cleanup_expired"
PERIOD = 2
"""Seconds between runs (``PROJ_CLEANUP_INTERVAL``)."""
PERIODS = 5


def slot_start(slot: int) -> datetime:
    return datetime.fromtimestamp(slot * PERIOD, UTC)


def cleanup_jobs(start: datetime, end: datetime) -> list[Job]:
    """The ledger's ``cleanup_expired`` rows created from ``start`` to ``end``."""
    with session_scope() as session:
        query = select(Job).where(Job.name == TASK, Job.created_at >= start, Job.created_at < end)
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def test_two_beats_run_each_period_once(
    stack: Stack, celery_app: Celery, commands: Commands, tmp_path: Path
) -> None:
    """Two beats (schedule files of their own, started one after the other)
    send ``cleanup_expired`` every 2 s, and both do try each time; over five
    periods the ledger has one run per period, each with its slot's job id
    (none sent outside the scheme), each delivered to the worker once and
    run once; the beat that comes second to a slot logs that it was sent
    already."""
    entry = ScheduleEntry(
        name="cleanup-expired", task=TASK, schedule=schedule(timedelta(seconds=PERIOD))
    )
    env = stack.process_env(PROJ_CLEANUP_INTERVAL=str(PERIOD))
    worker = commands.worker(env)
    beats = []
    for name in ("beat-1", "beat-2"):
        beat = commands.celery(
            name, "beat", "--loglevel=INFO", f"--schedule={tmp_path / name}", env=env
        )
        beat.wait_for_output("Sending due task cleanup-expired")
        beats.append(beat)

    first = slot_of(entry, utcnow()) + 1
    slots = range(first, first + PERIODS)
    ids = {
        slot_job_id(entry, slot_start(slot) + timedelta(seconds=PERIOD / 2)): slot for slot in slots
    }

    def ran() -> bool:
        with session_scope() as session:
            done = session.scalars(
                select(Job.id).where(Job.id.in_(ids), Job.state == State.SUCCEEDED)
            )
            return len(list(done)) == PERIODS

    worker.until(ran, timeout=30 + PERIOD * PERIODS)
    for beat in beats:
        assert beat.stop() == 0

    neighbours = {
        slot_job_id(entry, slot_start(slot) + timedelta(seconds=PERIOD / 2))
        for slot in (first - 1, first + PERIODS)
    }
    window = cleanup_jobs(slot_start(first), slot_start(first + PERIODS))
    assert [job.id for job in window if job.id not in ids and job.id not in neighbours] == []
    by_slot = Counter(ids[job.id] for job in window if job.id in ids)
    assert by_slot == Counter(dict.fromkeys(slots, 1))
    assert {job.attempts for job in window if job.id in ids} == {1}

    log = worker.output()
    for job_id in ids:
        assert log.count(f"Task {TASK}[{job_id}] received") == 1
        assert log.count(f"Task {TASK}[{job_id}] succeeded") == 1
    sent_already = sum(
        beat.output().count(f"for this slot was sent already (job {job_id})")
        for beat in beats
        for job_id in ids
    )
    assert sent_already >= PERIODS - 1
    assert all(beat.output().count("Sending due task cleanup-expired") >= PERIODS for beat in beats)
