"""Forks that leave no SQLite state to their children.

A prefork worker forks children at start and whenever one dies, while its
main process keeps using SQLite files (the embedded broker, the relay's ledger
rows). SQLite keeps, per process, a record of every file its connections have
open and of the locks they hold; a child inherits that record but not the
locks, and once it closes an inherited connection (even by garbage
collection) its own connections to the file can wait out their busy timeout
and fail with "database is locked". :func:`install_fork_gate` makes every
fork of the process wait until no other thread uses a SQLite connection, and
closes the idle ones first.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection, QueuePool

logger = logging.getLogger(__name__)

FORK_WAIT = 30.0
"""Seconds a fork waits for the process's SQLite connections to be returned."""
_USER = "proj.sqlite_forks.user"
"""Connection info key: the pid that took the connection, and the finalizer
that tells :data:`fork_gate` it is back."""


class SQLiteForkGate:
    """Keeps ``fork()`` apart from SQLite connections.

    A fork waits (up to :data:`FORK_WAIT`) until no other thread has a SQLite
    connection checked out, holds new checkouts off, and closes the idle ones
    in every pool, so the child inherits no open SQLite file at all (the
    parent's pools open new connections when next asked). A connection
    counts as in use from its opening or checkout until it goes back to its
    pool.
    """

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._users: Counter[int] = Counter()
        self._forking: int | None = None

    def opened(self, pool: Pool) -> None:
        """``pool`` holds SQLite connections: close its idle ones before a fork."""
        self._pools.add(pool)

    def enter(self) -> int:
        """A connection is taken in this thread (after any fork under way); its thread id."""
        me = threading.get_ident()
        with self._changed:
            while self._forking not in (None, me):
                self._changed.wait()
            self._users[me] += 1
        return me

    def leave(self, thread: int) -> None:
        """A connection taken in ``thread`` is back."""
        with self._changed:
            left = self._users.pop(thread, 0) - 1
            if left > 0:
                self._users[thread] = left
            self._changed.notify_all()

    def before_fork(self) -> None:
        """Wait until no other thread uses a connection; close the idle ones;
        hold new checkouts off until the fork is done."""
        me = threading.get_ident()
        self._changed.acquire()  # held until the fork is done
        self._forking = me
        deadline = time.monotonic() + FORK_WAIT
        while any(thread != me for thread in self._users):
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("forking while a SQLite connection is still in use")
                break
            self._changed.wait(left)
        for pool in list(self._pools):
            pool.dispose()  # closes the connections it holds, not those checked out

    def after_fork_in_parent(self) -> None:
        """Let checkouts go on."""
        self._forking = None
        self._changed.notify_all()
        self._changed.release()

    def after_fork_in_child(self) -> None:
        """Start the child with no connections in use and no fork under way."""
        # The parent's users are not the child's, and its lock is held by a
        # thread the child does not have.
        self._reset()


fork_gate = SQLiteForkGate()
"""The process's gate (see :func:`install_fork_gate`)."""
_installed: list[bool] = []


def install_fork_gate() -> None:
    """Have every fork of this process pass :data:`fork_gate` (once a process)."""
    if _installed:
        return
    _installed.append(True)
    event.listen(Engine, "do_connect", _connecting)
    event.listen(Pool, "checkout", _checked_out)
    for name in ("checkin", "invalidate", "close"):
        event.listen(Pool, name, _returned)
    os.register_at_fork(
        before=fork_gate.before_fork,
        after_in_parent=fork_gate.after_fork_in_parent,
        after_in_child=fork_gate.after_fork_in_child,
    )


def _connecting(dialect: Dialect, record: ConnectionPoolEntry, *_: Any) -> None:
    # From before the file is opened: SQLite's state for the file changes as
    # a connection opens it and sets it up (write-ahead logging), too.
    if dialect.name == "sqlite":
        _use(record)


def _checked_out(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    pool = proxy._pool
    if isinstance(pool, QueuePool):  # an in-memory database's pool must keep its one
        fork_gate.opened(pool)
    _use(record)


def _use(record: ConnectionPoolEntry) -> None:
    if _USER not in record.info:
        # A connection that fails to open is never returned: it is let go
        # when its record is collected.
        thread = fork_gate.enter()
        record.info[_USER] = (os.getpid(), weakref.finalize(record, fork_gate.leave, thread))


def _returned(dbapi_connection: Any, record: ConnectionPoolEntry | None, *_: Any) -> None:
    user = record.info.pop(_USER, None) if record is not None else None
    if user is not None and user[0] == os.getpid():
        user[1]()  # leaves the gate, once
