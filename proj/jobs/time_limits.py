"""Hard time limits on Celery's threads pool, which enforces none (celery#9203).

The prefork pool kills a child that runs past a task's ``time_limit``, and
its ledger job's attempt ends at once (``retrying``, or ``failed`` on its
last attempt). The threads pool (``proj run``'s) cannot kill a thread, so
proj does what can be done without killing it. At a run's hard limit its
ledger job's attempt ends as on prefork, and
:class:`~billiard.exceptions.TimeLimitExceeded` is raised in its thread
(with ``PyThreadState_SetAsyncExc``): its transaction rolls back, and its
thread is free for the next. Python raises it at the thread's next
bytecode, so a run blocked in a C call (a socket read without a timeout, a
long ``time.sleep``) sees it only when the call returns; its thread stays
busy until then, and its commit, if it gets that far, is refused (the
attempt it claimed has ended).

One watchdog thread a process keeps the deadlines.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from billiard.exceptions import TimeLimitExceeded

logger = logging.getLogger(__name__)

GRACE = 2.0
"""Seconds a run past its limit is given to end before the log says it is stuck."""


def hard_limit_of(task: Any) -> float | None:
    """The hard time limit of the run in progress, as Celery's worker reads it:
    the message's, else the task's, else ``task_time_limit``."""
    given = (task.request.timelimit or (None, None))[0]
    limit = given or task.time_limit or task.app.conf.task_time_limit
    return float(limit) if limit else None


class Watchdog:
    """Calls each watched function at its deadline, unless cancelled first."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, seconds: float, then: Callable[[], None]) -> int:
        """Call ``then`` in ``seconds``; a handle to cancel it with."""
        with self._changed:
            handle = next(self._order)
            entry = (time.monotonic() + seconds, handle, then)
            heapq.heappush(self._due, entry)
            self._live.add(handle)
            if self._thread is None or not self._thread.is_alive():  # a fork's child has none
                self._thread = threading.Thread(target=self._keep, name="proj-time-limits")
                self._thread.daemon = True
                self._thread.start()
            if self._due[0] is entry:  # sooner than it sleeps for
                self._changed.notify()
        return handle

    def cancel(self, handle: int) -> None:
        """Call nothing for ``handle`` after all."""
        with self._changed:
            self._live.discard(handle)
            if len(self._due) > 2 * len(self._live) + 64:  # drop the cancelled now and then
                self._due = [entry for entry in self._due if entry[1] in self._live]
                heapq.heapify(self._due)

    def _keep(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, handle, then = heapq.heappop(self._due)
                if handle not in self._live:
                    continue
                self._live.discard(handle)
            try:
                then()
            except Exception:
                logger.exception("time limits: a run's limit could not be enforced")


_watchdog = Watchdog()


@contextmanager
def enforced(limit: float | None, *, name: str, on_expiry: Callable[[], None]) -> Iterator[None]:
    """Enforce ``limit`` seconds on the block, run in this thread: past it,
    ``on_expiry`` is called (from the watchdog's thread), then
    :class:`TimeLimitExceeded` is raised in this one."""
    if not limit:
        yield
        return
    thread = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "raised": False}

    def interrupt() -> None:
        with lock:
            if state["done"]:
                return
            logger.error("%s: past its hard time limit (%g s); interrupting it", name, limit)
            on_expiry()
            state["raised"] = True
            _raise_in(thread, TimeLimitExceeded)

    def stuck() -> None:
        with lock:
            if not state["done"]:
                logger.error("%s: %g s past its limit, in a call it cannot leave", name, GRACE)

    handles = [_watchdog.watch(limit, interrupt), _watchdog.watch(limit + GRACE, stuck)]
    try:
        yield
    finally:
        with lock:
            state["done"] = True
            if state["raised"]:
                _raise_in(thread, None)  # one not raised yet is withdrawn
        for handle in handles:
            _watchdog.cancel(handle)


def _raise_in(thread: int, error: type[BaseException] | None) -> None:
    """Raise ``error`` in ``thread`` at its next bytecode (None: withdraw one
    not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), ctypes.py_object(error) if error else ctypes.c_void_p(0)
    )
