"""A deadline on every wait for PostgreSQL, kept by the client: a server that
accepts a connection and then says nothing (a failover that drops packets, a
partition) fails the statement in seconds, where the server's own
``statement_timeout`` cannot help (it never sees the statement).

Connections made by :func:`connect_args` carry their deadline; the first one
made puts psycopg2 in green mode (:func:`psycopg2.extensions.set_wait_callback`,
process-wide), so each wait on any psycopg2 connection goes through
:func:`wait`, which enforces the deadline of those that have one. A
connection past its deadline is closed (psycopg2 closes a connection whose
wait failed), which SQLAlchemy sees as a lost connection: the pool drops it,
and the error is transient. Green mode does not support ``COPY``; an
application that copies does without the deadline (set it to 0).

Inside :func:`within` (a web request, with :func:`per_request`), the waits of
those connections draw on one budget, the block's: a request that checks a
token, pings a connection, reconnects and runs its query answers within the
budget, not within a deadline for each of them.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import psycopg2
import psycopg2.extensions
from flask import Flask

_installed: list[bool] = []
_budget: ContextVar[tuple[float, float] | None] = ContextVar("proj_deadline", default=None)
"""The block's budget: when it ends (monotonic) and how many seconds it was."""


class DeadlineExceeded(psycopg2.OperationalError):
    """The database did not answer in time."""


def connect_args(seconds: float) -> dict[str, Any]:
    """psycopg2 ``connect_args`` giving each wait on the connection ``seconds``."""

    class Connection(psycopg2.extensions.connection):
        answer_within = seconds

    def connect(dsn: str, **kwargs: Any) -> psycopg2.extensions.connection:
        if not _installed:
            _installed.append(True)
            psycopg2.extensions.set_wait_callback(wait)
        return Connection(dsn, **kwargs)

    return {"connection_factory": connect}


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Inside the block, the waits of connections that have a deadline draw
    on one budget of ``seconds`` (0: each wait its own deadline only)."""
    token = _budget.set(_ending_in(seconds))
    try:
        yield
    finally:
        _budget.reset(token)


def per_request(flask_app: Flask, seconds: float) -> None:
    """Every request of ``flask_app`` runs :func:`within` ``seconds``."""

    def begin() -> None:
        _budget.set(_ending_in(seconds))

    def end(_: BaseException | None = None) -> None:
        _budget.set(None)

    flask_app.before_request(begin)
    flask_app.teardown_request(end)


def _ending_in(seconds: float) -> tuple[float, float] | None:
    return (time.monotonic() + seconds, seconds) if seconds else None


def wait(connection: Any) -> None:
    """psycopg2's wait callback: poll until the operation is done, giving up
    after the connection's ``answer_within`` seconds (if it has any), or
    sooner when the block's budget (:func:`within`) ends first."""
    limit: float | None = getattr(connection, "answer_within", None)
    deadline = time.monotonic() + limit if limit else None
    budget = _budget.get()
    if deadline is not None and budget is not None and budget[0] < deadline:
        deadline, limit = budget
    poller = select.poll()
    registered = None
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        events = select.POLLIN if state == psycopg2.extensions.POLL_READ else select.POLLOUT
        if state not in (psycopg2.extensions.POLL_READ, psycopg2.extensions.POLL_WRITE):
            raise psycopg2.OperationalError(f"unexpected state from poll(): {state}")
        if registered != events:
            if registered is not None:
                poller.unregister(connection.fileno())
            poller.register(connection.fileno(), events)
            registered = events
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"the database did not answer within {limit:g} s")
        poller.poll(None if left is None else max(1, int(left * 1000)))
