"""The fast path's publisher: a thread a process that publishes what its
committed transactions enqueued, so the committing request never waits on
the broker.

A commit hands its jobs' messages to :class:`Sender` and returns. The thread
takes whatever is waiting (up to :data:`BATCH` at a time) and, in one
transaction, marks the rows still owed to the broker published (one UPDATE,
which locks them), publishes their messages on one producer, trying once,
hands back to the relay any it could not publish, and commits. The relay
skips locked rows and published ones, so the two never both publish a job
however late either is. Whatever the thread does not publish (the broker
down, the process gone before its commit) the relay publishes after
``relay_grace`` seconds, as it publishes any job the fast path missed.

The thread is started on first use in each process (a forked child starts its
own), and the process waits up to :data:`EXIT_WAIT` seconds for it as it
exits. A job enqueued inside a task run is published in the run's own thread
as its transaction commits: Celery reads the run's ids there for the new
message's parent and root.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from proj.jobs import ledger, publisher

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs

logger = logging.getLogger(__name__)

BATCH = 500
"""Messages the thread marks in one UPDATE and publishes, at most, at a time."""
BACKLOG = 10_000
"""Messages that may wait for the thread; more are left to the relay (a
broker that blocks its publishers must not grow a process without bound)."""
EXIT_WAIT = 5.0
"""Seconds an exiting process waits for its sender to publish what it holds."""


class Sender:
    """The publishing thread of one installation in this process."""

    def __init__(self, jobs: Jobs) -> None:
        self._jobs = jobs
        self._pid = -1
        self._starting = threading.Lock()
        self._changed = threading.Condition()
        self._waiting: deque[tuple[Engine, Mapping[str, Any]]] = deque()
        self._handed = self._finished = 0
        self._exit_hooked = False

    def hand(self, engine: Engine, messages: Sequence[Mapping[str, Any]]) -> None:
        """Have the thread publish ``messages`` (of jobs whose rows ``engine``
        committed) and mark them published; returns at once."""
        if self._pid != os.getpid():
            self._start()
        with self._changed:
            room = max(BACKLOG - len(self._waiting), 0)
            taken = messages[:room]
            self._waiting.extend((engine, message) for message in taken)
            self._handed += len(taken)
            self._changed.notify_all()
        if len(taken) < len(messages):
            logger.warning(
                "%d committed jobs wait for the relay: %d messages are already waiting to be "
                "published (is the broker blocking publishers?)",
                len(messages) - len(taken),
                BACKLOG,
            )

    def flush(self, timeout: float = EXIT_WAIT) -> bool:
        """Wait until the thread has published, or given up on, every message
        handed to it so far; False if ``timeout`` seconds passed first."""
        if self._pid != os.getpid():
            return True  # nothing was handed in this process
        with self._changed:
            target = self._handed
            return self._changed.wait_for(lambda: self._finished >= target, timeout)

    def _start(self) -> None:
        with self._starting:
            if self._pid == os.getpid():
                return
            # In a forked child: the parent's thread and what it held stay the parent's.
            self._changed = threading.Condition()
            self._waiting = deque()
            self._handed = self._finished = 0
            threading.Thread(target=self._run, name="proj-sender", daemon=True).start()
            self._pid = os.getpid()
            if not self._exit_hooked:
                atexit.register(self.flush)
                self._exit_hooked = True

    def _run(self) -> None:
        changed, waiting = self._changed, self._waiting
        while True:
            with changed:
                changed.wait_for(lambda: bool(waiting))
                batch = [waiting.popleft() for _ in range(min(BATCH, len(waiting)))]
            try:
                self._send(batch)
            except Exception:  # the thread must outlive any one batch
                logger.warning(
                    "the fast path could not publish %d committed jobs; the relay will",
                    len(batch),
                    exc_info=True,
                )
            finally:
                with changed:
                    self._finished += len(batch)
                    changed.notify_all()

    def _send(self, batch: Sequence[tuple[Engine, Mapping[str, Any]]]) -> None:
        by_engine: dict[Engine, list[Mapping[str, Any]]] = {}
        for engine, message in batch:
            by_engine.setdefault(engine, []).append(message)
        for engine, messages in by_engine.items():
            with engine.connect() as connection, connection.begin():
                taken = set(ledger.take_owed(connection, [m["id"] for m in messages]))
                mine = [message for message in messages if message["id"] in taken]
                published = set(publisher.publish_at_once(self._jobs, mine) if mine else ())
                if len(published) < len(mine):
                    ledger.owed_again(
                        connection, [m["id"] for m in mine if m["id"] not in published]
                    )
