"""Running the outbox relay: as ``proj relay``, or in a thread of each worker
(``PROJ_RELAY_IN_WORKER``, the default, for small deployments)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps

from proj.config import Settings, current_settings
from proj.db import make_engine
from proj.outbox import Outbox

logger = logging.getLogger(__name__)

RELAY_POOL_SIZE = 1
"""Connections in a relay's pool (publishing); the listening one is its own."""


def make_outbox(celery_app: Celery, settings: Settings | None = None) -> Outbox:
    """An :class:`Outbox` for ``settings``, on an engine of its own."""
    settings = settings or current_settings()
    engine = make_engine(settings.database_url, RELAY_POOL_SIZE, role="relay")
    return Outbox(
        celery_app,
        engine,
        poll_interval=settings.relay_poll_interval,
        grace=settings.relay_grace if settings.outbox_fast_path else 0.0,
    )


class RelayStep(bootsteps.StartStopStep):
    """A worker step running the relay in a thread of the worker's main process."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.outbox: Outbox | None = None

    def start(self, worker: Any) -> None:
        if not current_settings().relay_in_worker:
            return
        self.stopping.clear()
        self.outbox = make_outbox(worker.app)
        self.thread = threading.Thread(
            target=self.outbox.relay, args=(self.stopping,), name="proj-relay", daemon=True
        )
        self.thread.start()

    def stop(self, worker: Any) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        if self.outbox is not None:
            self.outbox.engine.dispose()
            self.outbox = None

    def terminate(self, worker: Any) -> None:
        # A cold shutdown (and an in-process worker's stop) terminates steps
        # instead of stopping them; the relay thread must end either way.
        self.stop(worker)
