"""The outbox relay: publishes the committed jobs the fast path missed, and
each job with a countdown or ETA when it falls due.

It runs in a thread of each worker (``PROJ_RELAY_IN_WORKER``, the default, for
small deployments), or on its own (``Relay(...).relay(stop)``; the reference
application's ``proj relay``). On PostgreSQL it wakes on ``LISTEN``/
``NOTIFY`` and polls as well (a NOTIFY sent while it is disconnected is lost);
on SQLite it polls.
"""

from __future__ import annotations

import logging
import select as select_module
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery import Celery, bootsteps
from sqlalchemy import Engine, or_
from sqlalchemy.sql.elements import ColumnElement

from proj.jobs import context, metrics, metrics_server
from proj.jobs.clock import utcnow
from proj.jobs.engine import make_engine
from proj.jobs.models import Job
from proj.jobs.publisher import next_due, publish_owed
from proj.jobs.registry import jobs_of
from proj.jobs.settings import JobsSettings

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "proj_jobs"
"""What the ledger's trigger notifies when a row is owed to the broker (PostgreSQL)."""
STOP_CHECK = 0.25
"""Seconds a waiting relay may take to notice it is asked to stop."""
SOON = 0.01
"""Seconds before a relay looks again at a job that is due and not yet published."""
RELAY_POOL_SIZE = 1
"""Connections in a relay's pool (publishing); the listening one is its own."""


class Relay:
    """Publishes the jobs the fast path did not.

    Several relays may run at once (``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
    on SQLite they take turns). A row is marked published in the transaction
    that claimed it, after the broker confirmed its message; a relay that dies
    in between leaves the row to be published again, with the same id (the
    worker's claim makes the second delivery a no-op).
    """

    def __init__(
        self,
        celery_app: Celery,
        engine: Engine,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        grace: float = 0.0,
    ) -> None:
        self.celery_app = celery_app
        self.engine = engine
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.grace = grace
        """Seconds a row is left to the fast path before the relay takes it."""
        self.published = 0

    def relay_once(self) -> int:
        """Publish one batch of owed jobs that are due; return how many."""
        with self.engine.connect() as connection, connection.begin():
            context.scope_system(connection)
            count = publish_owed(connection, self.celery_app, self._ours(), limit=self.batch_size)
        self.published += count
        metrics.relayed(count)
        return count

    def _ours(self) -> ColumnElement[bool]:
        """The owed rows this relay takes: a job due at once is the fast
        path's for ``grace`` seconds; one due later is the relay's alone."""
        cutoff = utcnow() - timedelta(seconds=self.grace)
        return or_(Job.created_at <= cutoff, Job.available_at > Job.created_at)

    def pause(self) -> float:
        """Seconds to wait before the next pass: ``poll_interval``, or less if
        one of its owed jobs falls due sooner (it is published on time,
        however long ago its row was written). One that fell due during the
        last pass (or that another relay holds) is looked at again after
        :data:`SOON`."""
        with self.engine.connect() as connection:
            context.scope_system(connection)
            due = next_due(connection, self._ours())
        if due is None:
            return self.poll_interval
        left = (due - utcnow()).total_seconds()
        return max(SOON, left) if left < self.poll_interval else self.poll_interval

    def relay(self, stop: threading.Event) -> None:
        """Publish owed jobs until ``stop`` is set: at once when notified (on
        PostgreSQL), when the next one falls due, and every ``poll_interval``
        seconds in any case.

        A relay of its own (not in a worker) serves its ``/metrics`` on
        ``PROJ_METRICS_PORT`` meanwhile (:func:`proj.jobs.metrics_server.serving`);
        :class:`~proj.jobs.ConfigurationError` if it cannot listen there."""
        settings = jobs_of(self.celery_app).settings
        with metrics_server.serving(settings), self._notifications(stop) as wait:
            while not stop.is_set():
                try:
                    while self.relay_once() and not stop.is_set():
                        pass
                    pause = self.pause()
                except Exception:
                    logger.exception("relay: publishing failed; trying again shortly")
                    stop.wait(self.poll_interval)
                    continue
                wait(pause)

    @contextmanager
    def _notifications(self, stop: threading.Event) -> Iterator[Callable[[float], object]]:
        """A ``wait(timeout)`` that returns early on a NOTIFY (on PostgreSQL)
        or once ``stop`` is set. It listens again after the listening
        connection is lost (a NOTIFY sent meanwhile is lost; polling covers it).

        With a grace period (the fast path on) it only polls: a NOTIFY comes
        as a job is written, when its row is still the fast path's to publish,
        so waking on it would only cost a query per job.
        """
        if self.engine.dialect.name != "postgresql" or self.grace > 0:
            yield stop.wait
            return
        listener: list[Any] = []

        def wait(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            try:
                if not listener:
                    # Out of the pool: autocommit must not follow the
                    # connection back to a publishing transaction.
                    connection = self.engine.raw_connection()
                    connection.detach()
                    listener.append(connection)
                    connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
                    connection.cursor().execute(f"LISTEN {NOTIFY_CHANNEL}")
                raw: Any = listener[0].dbapi_connection
                while not stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    if select_module.select([raw], [], [], min(left, STOP_CHECK))[0]:
                        raw.poll()
                        if raw.notifies:
                            raw.notifies.clear()
                            return
            except Exception as exc:
                logger.warning("relay: lost the LISTEN connection (%s); listening again", exc)
                for connection in listener:
                    connection.invalidate()
                listener.clear()
                stop.wait(min(timeout, 1.0))

        try:
            yield wait
        finally:
            for connection in listener:
                connection.close()


def make_relay(celery_app: Celery, settings: JobsSettings | None = None) -> Relay:
    """A :class:`Relay` for ``celery_app``'s jobs (or ``settings``), on an
    engine of its own."""
    settings = settings or jobs_of(celery_app).settings
    engine = make_engine(settings.database_url, RELAY_POOL_SIZE, role="relay")
    return Relay(
        celery_app,
        engine,
        poll_interval=settings.relay_poll_interval,
        grace=settings.relay_grace if settings.outbox_fast_path else 0.0,
    )


class RelayStep(bootsteps.StartStopStep):
    """A worker step running the relay in a thread of the worker's main process.

    It starts after the pool has forked its first children: a thread running
    while a process forks can hold a lock (SQLAlchemy's mapper configuration,
    SQLite's) that the child then waits for forever.
    """

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.relay: Relay | None = None

    def start(self, worker: Any) -> None:
        if not jobs_of(worker.app).settings.relay_in_worker:
            return
        self.stopping.clear()
        self.relay = make_relay(worker.app)
        self.thread = threading.Thread(
            target=self.relay.relay, args=(self.stopping,), name="proj-relay", daemon=True
        )
        self.thread.start()

    def stop(self, worker: Any) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        if self.relay is not None:
            self.relay.engine.dispose()
            self.relay = None

    def terminate(self, worker: Any) -> None:
        # A cold shutdown (and an in-process worker's stop) terminates steps
        # instead of stopping them; the relay thread must end either way.
        self.stop(worker)
