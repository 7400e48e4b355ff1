"""Forks kept out of SQLite writes.

A prefork worker forks children at start and whenever one dies, while its
main process keeps writing SQLite files (the embedded broker, the relay's
ledger rows). A child forked in the middle of such a write could never write
that file (see :class:`SQLiteForkGate`); :func:`install_fork_gate` makes every
fork of the process wait for writes in progress to end.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.pool import ConnectionPoolEntry, Pool

logger = logging.getLogger(__name__)

FORK_WAIT = 30.0
"""Seconds a fork waits for the process's SQLite writes to end before going ahead."""
WRITES = re.compile(
    r"\s*(BEGIN\s+(IMMEDIATE|EXCLUSIVE)|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER)\b",
    re.IGNORECASE,
)
"""Statements that make a SQLite connection take the file's write lock."""
_WRITING = "proj.broker.writing"
"""Connection info key: ``(pid, thread)`` of a connection that is writing."""


class SQLiteForkGate:
    """Keeps ``fork()`` out of SQLite write transactions.

    SQLite records, per process, the locks its connections hold on each file.
    A child forked while another thread of its parent is writing a file
    inherits that record but not the lock, and none of the child's own
    connections can ever write the file: each waits out its busy timeout and
    fails with "database is locked". A prefork worker forks children at start
    and whenever one dies, while its relay thread writes the ledger and
    publishes to this broker. So a fork waits (up to :data:`FORK_WAIT`) until
    no other thread is writing, and a write waits while a fork is under way.
    A connection counts as writing from its first writing statement until it
    goes back to its pool (after its commit or rollback).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._writers: Counter[int] = Counter()
        self._forking: int | None = None

    def enter(self) -> int:
        """A write begins in this thread (after any fork under way); its thread id."""
        me = threading.get_ident()
        with self._changed:
            while self._forking not in (None, me):
                self._changed.wait()
            self._writers[me] += 1
        return me

    def leave(self, thread: int) -> None:
        """A write that began in ``thread`` has ended."""
        with self._changed:
            left = self._writers.pop(thread, 0) - 1
            if left > 0:
                self._writers[thread] = left
            self._changed.notify_all()

    def before_fork(self) -> None:
        """Wait until no other thread is writing; hold new writes off until
        the fork is done."""
        me = threading.get_ident()
        self._changed.acquire()  # held until the fork is done
        self._forking = me
        deadline = time.monotonic() + FORK_WAIT
        while any(thread != me for thread in self._writers):
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("forking while a SQLite write is still in progress")
                return
            self._changed.wait(left)

    def after_fork_in_parent(self) -> None:
        """Let writes go on."""
        self._forking = None
        self._changed.notify_all()
        self._changed.release()

    def after_fork_in_child(self) -> None:
        """Start the child with no writes and no fork under way."""
        # The parent's writers are not the child's, and its lock is held by
        # a thread the child does not have.
        self._reset()


fork_gate = SQLiteForkGate()
"""The process's gate (see :func:`install_fork_gate`)."""
_installed: list[bool] = []


def install_fork_gate() -> None:
    """Have every fork of this process pass :data:`fork_gate` (once a process)."""
    if _installed:
        return
    _installed.append(True)
    event.listen(Engine, "before_cursor_execute", _before_cursor_execute)
    for name in ("checkin", "invalidate", "close"):
        event.listen(Pool, name, _writes_ended)
    os.register_at_fork(
        before=fork_gate.before_fork,
        after_in_parent=fork_gate.after_fork_in_parent,
        after_in_child=fork_gate.after_fork_in_child,
    )


def _before_cursor_execute(
    connection: Connection, cursor: Any, statement: str, *_: Any, **__: Any
) -> None:
    if connection.dialect.name != "sqlite" or _WRITING in connection.info:
        return
    if WRITES.match(statement):
        connection.info[_WRITING] = (os.getpid(), fork_gate.enter())


def _writes_ended(dbapi_connection: Any, record: ConnectionPoolEntry, *_: Any) -> None:
    writing = record.info.pop(_WRITING, None) if record is not None else None
    if writing is not None and writing[0] == os.getpid():
        fork_gate.leave(writing[1])
