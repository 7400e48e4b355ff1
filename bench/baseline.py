"""The baseline: plain Celery with the classic recipe (a module-level scoped
session removed in ``after_return``), Celery's default settings otherwise.

Run as ``celery -A bench.baseline worker``; configured from the same
environment variables as proj (``DATABASE_URL``, ``CELERY_BROKER_URL``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, Task
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

from bench import stats, workload

app = Celery("baseline", broker=os.environ["CELERY_BROKER_URL"])
# A queue of its own: proj's "celery" queue in the same vhost is a priority
# queue, which RabbitMQ would refuse to declare again as a plain one.
app.conf.task_default_queue = "baseline"

engine = create_engine(os.environ["DATABASE_URL"], pool_size=5)
Session = scoped_session(sessionmaker(bind=engine))
workload.announce_ready()
stats.count_in_worker()


class DatabaseTask(Task):  # type: ignore[type-arg]
    def after_return(self, *args: Any, **kwargs: Any) -> None:
        Session.remove()


@app.task(base=DatabaseTask, name="bench.touch", ignore_result=True)
def touch(user_id: int, enqueued_at: float) -> None:
    workload.touch(Session(), user_id, enqueued_at, time.time())
    Session.commit()
