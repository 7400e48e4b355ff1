"""The database resource: engines, the declarative ``Base`` and the task session.

The web tier (Flask-SQLAlchemy) and the worker tier each get their own engine
and pool, sized separately. ``Session`` is scoped by the running task, not only
by thread: each task run sees its own session, whatever pool it runs on and
whoever called it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    MetaData,
    TypeDecorator,
    create_engine,
    event,
    exc,
    orm,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from proj.config import Settings, current_settings, load_settings, use_settings

PING_AFTER_IDLE = 1.0
"""Seconds a pooled connection may rest before its next checkout pings it."""

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC (what every timestamp column holds)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database (SQLite included)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(orm.DeclarativeBase):
    """The declarative base every proj model derives from (web and worker alike)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


_task_scope: ContextVar[str | None] = ContextVar("proj_task_scope", default=None)
"""The key of the task run in progress in this context (the task id and a run
number, unique to the run)."""


def current_scope() -> Hashable:
    """The key ``Session`` is scoped by: the running task, else the thread."""
    return _task_scope.get() or ("thread", threading.get_ident())


def in_task_run() -> bool:
    """True while a task run is in progress in this context."""
    return _task_scope.get() is not None


@contextmanager
def task_scope(key: str) -> Iterator[None]:
    """Make ``Session`` resolve to the session of the task run named ``key``."""
    token = _task_scope.set(key)
    try:
        yield
    finally:
        _task_scope.reset(token)


class _State:
    worker_engine: Engine | None = None
    lock = threading.Lock()


def configure(settings: Settings | None = None) -> None:
    """Point the worker tier at ``settings`` (default: the environment's).

    The previous worker engine, if any, is disposed. Tests and ``proj.testing``
    call this; applications need not, as the engine is made on first use.
    """
    with _State.lock:
        if _State.worker_engine is not None:
            _State.worker_engine.dispose()
        use_settings(settings or load_settings())
        _State.worker_engine = None


def worker_engine() -> Engine:
    """The worker tier's engine, made on first use (after fork, in the child)."""
    engine = _State.worker_engine
    if engine is None:
        cfg = current_settings()
        with _State.lock:
            if _State.worker_engine is None:
                _State.worker_engine = make_engine(
                    cfg.database_url, cfg.worker_pool_size, role="worker"
                )
            engine = _State.worker_engine
    return engine


def existing_worker_engine() -> Engine | None:
    """The worker tier's engine if this process has made it, else None."""
    return _State.worker_engine


def make_sqlite_folder(url: str) -> None:
    """Create the folder a SQLite file URL points into (nothing for other URLs)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, pool_size: int, *, role: str) -> Engine:
    """An engine with proj's options and connection hooks (see :func:`prepare_engine`)."""
    make_sqlite_folder(url)
    return prepare_engine(create_engine(url, **engine_options(url, pool_size)), role=role)


def engine_options(url: str, pool_size: int) -> dict[str, Any]:
    """``create_engine`` keyword arguments proj uses for ``url``."""
    options: dict[str, Any] = {}
    if url.startswith("sqlite"):
        if ":memory:" not in url and url.rstrip("/") != "sqlite:":
            options.update(pool_size=pool_size, connect_args={"timeout": 30})
    else:
        options.update(pool_size=pool_size, max_overflow=pool_size)
        if url.startswith("postgresql"):
            # A server that drops packets must not hang a request or a task
            # for the operating system's TCP timeout.
            options["connect_args"] = {"connect_timeout": 5}
    return options


def prepare_engine(engine: Engine, *, role: str) -> Engine:
    """Attach proj's connection hooks to ``engine`` before it connects.

    - a connection is tagged with the process that opened it and is never used
      by another (a forked child opens its own instead of touching the parent's);
    - a connection that rested in the pool for more than :data:`PING_AFTER_IDLE`
      is pinged before use, and replaced if the server dropped it. SQLAlchemy's
      ``pool_pre_ping`` pings on every checkout, a round trip per task; a
      connection back in use within a second does not need one, and a
      disconnect met in use invalidates the whole pool anyway;
    - on PostgreSQL, ``application_name`` is ``proj-<role>:<pid>``, so
      ``pg_stat_activity`` shows which process holds which connection;
    - on SQLite, write-ahead logging lets the web, worker and beat share a file.
    """

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["pid"] = os.getpid()
        record.info["resting_since"] = time.monotonic()
        if engine.dialect.name == "sqlite":
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    @event.listens_for(engine, "checkout")
    def on_checkout(
        dbapi_connection: Any,
        record: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
    ) -> None:
        if record.info.get("pid") != os.getpid():
            # Forget the inherited connection without closing it: closing
            # would end the parent's session on the shared socket.
            record.dbapi_connection = None  # type: ignore[misc]
            raise exc.DisconnectionError("connection opened in another process; opening a new one")
        rested = time.monotonic() - record.info["resting_since"]
        if rested > PING_AFTER_IDLE and not _answers(engine, dbapi_connection):
            raise exc.DisconnectionError("the server dropped this connection; opening a new one")

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["resting_since"] = time.monotonic()

    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "do_connect")
        def on_do_connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            cparams.setdefault("application_name", f"proj-{role}:{os.getpid()}")

    return engine


def _answers(engine: Engine, dbapi_connection: Any) -> bool:
    """Whether the server still answers on ``dbapi_connection``."""
    try:
        return bool(engine.dialect.do_ping(dbapi_connection))
    except engine.dialect.loaded_dbapi.Error as error:
        if engine.dialect.is_disconnect(error, dbapi_connection, None):
            return False
        raise


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A pooled connection on which each statement commits on its own: no
    ``BEGIN`` and no ``COMMIT`` on the wire.

    On psycopg2 the driver's ``autocommit`` switch is flipped and flipped back
    before the connection returns to the pool. SQLAlchemy's
    ``isolation_level="AUTOCOMMIT"`` option would restore the level on return
    with psycopg2's ``set_isolation_level``, which costs a round trip.
    """
    with engine.connect() as connection:
        if engine.driver != "psycopg2":
            yield connection.execution_options(isolation_level="AUTOCOMMIT")
            return
        driver = connection.connection.driver_connection
        driver.autocommit = True  # type: ignore[union-attr]
        try:
            yield connection
        finally:
            connection.rollback()  # nothing on the wire: there is no transaction
            if not driver.closed:  # type: ignore[union-attr]
                driver.autocommit = False  # type: ignore[union-attr]


def dispose_after_fork() -> None:
    """Drop the inherited worker pool in a forked child, leaving the parent's
    sockets alone (``dispose(close=False)``)."""
    if _State.worker_engine is not None:
        _State.worker_engine.dispose(close=False)


class _WorkerSessionmaker(orm.sessionmaker[orm.Session]):
    def __call__(self, **local_kw: Any) -> orm.Session:
        local_kw.setdefault("bind", worker_engine())
        return super().__call__(**local_kw)


session_factory = _WorkerSessionmaker()
"""Makes sessions bound to the worker engine (on first use)."""

Session = orm.scoped_session(session_factory, scopefunc=current_scope)
"""The task-scoped session: inside a task run, the session of that run."""


@contextmanager
def session_scope() -> Iterator[orm.Session]:
    """A session for scripts: commits on success, rolls back on error, closes."""
    session = session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
