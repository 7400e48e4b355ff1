"""Engines with proj's options and connection hooks.

A URL's driver is the one proj ships (``postgresql://`` and ``postgres://``
mean psycopg2); a URL naming a driver that is not installed is refused with
an error that says what to install.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from proj.jobs import deadlines
from proj.jobs.errors import ConfigurationError

PING_AFTER_IDLE = 1.0
"""Seconds a pooled connection may rest before its next checkout pings it."""

DRIVERS = {"postgresql": "psycopg2", "postgres": "psycopg2"}
"""The driver a URL that names none gets: the one proj ships."""
PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000"}
"""What to ``pip install`` for a driver, where its package name differs."""


def resolve_url(url: str) -> str:
    """``url`` with the driver proj ships where it names none (SQLAlchemy 2.1
    would pick psycopg 3 for ``postgresql://``; ``postgres://``, as platforms
    hand it out, is PostgreSQL too).

    Raises :class:`ConfigurationError` when the URL is not one SQLAlchemy can
    read, or names a driver that is not installed, saying what to install.
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise ConfigurationError(f"{_hidden(url)} is not a database URL.") from None
    backend, _, driver = parsed.drivername.partition("+")
    if not driver and backend in DRIVERS:
        parsed = parsed.set(drivername=f"postgresql+{DRIVERS[backend]}")
    elif backend == "postgres":
        parsed = parsed.set(drivername=f"postgresql+{driver}")
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as error:
        module = (error.name or driver or backend).split(".")[0]
        package = PACKAGES.get(module, module)
        raise ConfigurationError(
            f"{_hidden(url)} needs the {module} driver, which is not installed: "
            f"pip install {package} (or name an installed driver, as in postgresql+psycopg2://)."
        ) from None
    except exc.NoSuchModuleError:
        raise ConfigurationError(
            f"{_hidden(url)}: SQLAlchemy has no dialect {parsed.drivername!r}."
        ) from None
    return parsed.render_as_string(hide_password=False)


RESULT_BACKEND_PREFIX = "db+"
"""How Celery's database result backend URLs begin (``db+postgresql://...``)."""


def resolve_result_backend(url: str) -> str:
    """Celery's ``result_backend`` with :func:`resolve_url` applied to a
    database backend's URL (``db+postgresql://`` would otherwise load psycopg
    3); any other backend as given. Raises :class:`ConfigurationError` as
    :func:`resolve_url` does."""
    if not url.startswith(RESULT_BACKEND_PREFIX):
        return url
    return RESULT_BACKEND_PREFIX + resolve_url(url.removeprefix(RESULT_BACKEND_PREFIX))


def _hidden(url: str) -> str:
    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except exc.ArgumentError:
        return "the URL given"


def make_sqlite_folder(url: str) -> None:
    """Create the folder a SQLite file URL points into (nothing for other URLs)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


CONNECT_TIMEOUT = 5
"""Seconds to open a connection, or to take one from a full pool."""
UNANSWERED_AFTER = 10
"""Seconds a PostgreSQL connection may go without the server acknowledging what
was sent (or answering keepalives while idle) before it counts as lost."""


def make_engine(
    url: str,
    pool_size: int,
    *,
    role: str,
    statement_timeout: float = 0,
    lock_timeout: float = 0,
    answer_within: float = 0,
) -> Engine:
    """An engine with proj's options and connection hooks (see
    :func:`engine_options` and :func:`prepare_engine`)."""
    url = resolve_url(url)
    make_sqlite_folder(url)
    options = engine_options(
        url,
        pool_size,
        statement_timeout=statement_timeout,
        lock_timeout=lock_timeout,
        answer_within=answer_within,
    )
    return prepare_engine(create_engine(url, **options), role=role)


def engine_options(
    url: str,
    pool_size: int,
    *,
    statement_timeout: float = 0,
    lock_timeout: float = 0,
    answer_within: float = 0,
) -> dict[str, Any]:
    """``create_engine`` keyword arguments proj uses for ``url``: a pool of
    ``pool_size`` (as many again in overflow) that gives up on a checkout after
    :data:`CONNECT_TIMEOUT`; on PostgreSQL every wait bounded, so a server
    that stops answering (a partition, a failover that drops packets) gives
    an error in seconds instead of a hang:

    - ``connect_timeout``, TCP keepalives and ``tcp_user_timeout``
      (:data:`CONNECT_TIMEOUT`, :data:`UNANSWERED_AFTER`);
    - ``statement_timeout`` and ``lock_timeout`` in seconds (0: none), which
      the server enforces (SQLSTATE 57014 and 55P03, both transient);
    - ``answer_within`` seconds (0: none), which the client enforces on each
      wait for the server (:mod:`proj.jobs.deadlines`): a server that went
      silent fails the statement as a lost connection.
    """
    options: dict[str, Any] = {}
    if url.startswith("sqlite"):
        if ":memory:" not in url and url.rstrip("/") != "sqlite:":
            options.update(pool_size=pool_size, connect_args={"timeout": 30})
        return options
    options.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=CONNECT_TIMEOUT)
    if url.startswith("postgresql"):
        psycopg2 = make_url(url).get_driver_name() == "psycopg2"
        limits = " ".join(
            f"-c {name}={int(seconds * 1000)}"
            for name, seconds in (
                ("statement_timeout", statement_timeout),
                ("lock_timeout", lock_timeout),
            )
            if seconds
        )
        options["connect_args"] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "keepalives": 1,
            "keepalives_idle": UNANSWERED_AFTER // 2,
            "keepalives_interval": 1,
            "keepalives_count": UNANSWERED_AFTER // 2,
            "tcp_user_timeout": UNANSWERED_AFTER * 1000,
            **({"options": limits} if limits else {}),
            **(deadlines.connect_args(answer_within) if answer_within and psycopg2 else {}),
        }
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
