"""Worker heartbeats: each worker's main process records, every
``PROJ_HEARTBEAT_INTERVAL`` seconds, that it is alive (``job_workers``), so the
reconciler can take back the jobs of a worker that stopped beating without
asking the broker who is alive.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection
from datetime import datetime
from typing import Any

from celery import bootsteps
from sqlalchemy import Engine, case, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from proj.jobs.clock import utcnow
from proj.jobs.engine import make_engine
from proj.jobs.models import WORKERS, WorkerBeat
from proj.jobs.registry import jobs_of

logger = logging.getLogger(__name__)


def beat(engine: Engine, hostname: str, started_at: datetime) -> None:
    """Record that the worker ``hostname`` (its incarnation begun at
    ``started_at``) is alive now."""
    values = {"hostname": hostname, "pid": os.getpid(), "started_at": started_at}
    with engine.begin() as connection:
        dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
        upsert = dialect.insert(WORKERS).values(**values, beat_at=utcnow())
        same_process = WORKERS.c.pid == upsert.excluded.pid
        connection.execute(
            upsert.on_conflict_do_update(
                index_elements=["hostname"],
                set_={
                    "pid": upsert.excluded.pid,
                    # A new process under the same name is a new incarnation.
                    "started_at": case(
                        (same_process, WORKERS.c.started_at), else_=upsert.excluded.started_at
                    ),
                    "beat_at": upsert.excluded.beat_at,
                },
            )
        )


def forget(engine: Engine, hostname: str) -> None:
    """The worker ``hostname`` stopped on purpose: no heartbeat to miss."""
    with engine.begin() as connection:
        connection.execute(delete(WorkerBeat).where(WorkerBeat.hostname == hostname))


def beats(session: Session, hostnames: Collection[str]) -> dict[str, WorkerBeat]:
    """The last heartbeat of each of these workers that has one."""
    query = select(WorkerBeat).where(WorkerBeat.hostname.in_(hostnames))
    return {found.hostname: found for found in session.scalars(query)}


class HeartbeatStep(bootsteps.StartStopStep):
    """A worker step beating in a thread of the worker's main process (after
    the pool has forked: see :class:`~proj.jobs.relay.RelayStep`)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.engine: Engine | None = None

    def start(self, worker: Any) -> None:
        settings = jobs_of(worker.app).settings
        every = settings.heartbeat_interval
        if not every:
            return
        hostname, started_at = str(worker.hostname), utcnow()
        # A connection of its own: never one the tasks' pool counts or waits for.
        engine = self.engine = make_engine(settings.database_url, 1, role="heartbeat")
        self.stopping.clear()

        def keep_beating() -> None:
            while not self.stopping.is_set():
                try:
                    beat(engine, hostname, started_at)
                except Exception as exc:
                    logger.warning("heartbeat of %s not recorded (%s)", hostname, exc)
                self.stopping.wait(every)

        self.thread = threading.Thread(target=keep_beating, name="proj-heartbeat", daemon=True)
        self.thread.start()

    def stop(self, worker: Any) -> None:
        if self.thread is None or self.engine is None:
            return
        self.stopping.set()
        self.thread.join(timeout=10)
        self.thread = None
        try:
            forget(self.engine, str(worker.hostname))
        except Exception as exc:
            logger.warning("heartbeat of %s not removed (%s)", worker.hostname, exc)
        self.engine.dispose()
        self.engine = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
