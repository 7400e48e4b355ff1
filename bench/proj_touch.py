"""The workload's task on proj's ``SqlAlchemyTask`` (``--include bench.proj_touch``),
with proj's defaults as they are, and the same task for a user who opts in to
Celery's stored results (``ignore_result=False``)."""

from __future__ import annotations

import time

from celery import shared_task

from bench import stats, workload
from proj.db import Session
from proj.jobs import SqlAlchemyTask

workload.announce_ready()
stats.count_in_worker()


@shared_task(name="bench.touch", base=SqlAlchemyTask)
def touch(user_id: int, enqueued_at: float) -> None:
    workload.touch(Session(), user_id, enqueued_at, time.time())


@shared_task(name="bench.touch_stored", ignore_result=False, base=SqlAlchemyTask)
def touch_stored(user_id: int, enqueued_at: float) -> None:
    workload.touch(Session(), user_id, enqueued_at, time.time())
