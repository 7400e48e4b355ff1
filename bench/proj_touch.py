"""The workload's task on proj's ``SqlAlchemyTask`` (``--include bench.proj_touch``)."""

from __future__ import annotations

import time

from celery import shared_task

from bench import stats, workload
from proj.db import Session
from proj.jobs import SqlAlchemyTask

workload.announce_ready()
stats.count_in_worker()


@shared_task(name="bench.touch", ignore_result=True, base=SqlAlchemyTask)
def touch(user_id: int, enqueued_at: float) -> None:
    workload.touch(Session(), user_id, enqueued_at, time.time())
