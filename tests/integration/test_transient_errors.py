"""TRANSIENT_ERRORS against errors the real databases raise: the ones that heal
by themselves are recognised (by SQLSTATE, SQLite's result code or an
invalidated connection) and the ones that do not are not."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

import proj.jobs.testing
from proj.jobs.engine import prepare_engine
from proj.jobs.retry import TRANSIENT_ERRORS

if TYPE_CHECKING:
    from conftest import Stack


@pytest.fixture(scope="module")
def engine(stack: Stack) -> Iterator[Engine]:
    """An engine on the stack's database that keeps no connection after use."""
    made = create_engine(stack.settings.database_url, poolclass=NullPool)
    yield made
    made.dispose()


@pytest.fixture
def pg(stack: Stack, engine: Engine) -> Engine:
    if not stack.on_postgres:
        pytest.skip("PostgreSQL's SQLSTATEs: this stack runs SQLite")
    return engine


@pytest.fixture
def sqlite(stack: Stack, engine: Engine) -> Iterator[Engine]:
    """The stack's SQLite file, with no busy timeout: a lock is an error at once."""
    if stack.on_postgres:
        pytest.skip("SQLite's result codes: this stack runs PostgreSQL")
    made = create_engine(engine.url, poolclass=NullPool, connect_args={"timeout": 0})
    yield prepare_engine(made, role="test")  # write-ahead logging, as proj's engines
    made.dispose()


def raised(action: Callable[[], Any]) -> sa_exc.DBAPIError:
    """The database error ``action`` raises."""
    with pytest.raises(sa_exc.DBAPIError) as caught:
        action()
    return caught.value


def sqlstate(error: sa_exc.DBAPIError) -> str | None:
    return getattr(error.orig, "pgcode", None)


def new_user(engine: Engine) -> int:
    with engine.begin() as connection:
        return int(
            connection.scalar(
                text("INSERT INTO users (email, created_at) VALUES (:e, now()) RETURNING id"),
                {"e": f"transient-{uuid.uuid4().hex}@example.com"},
            )
        )


def touch(connection: Connection, user_id: int) -> None:
    connection.execute(text("UPDATE users SET welcomed_at = now() WHERE id = :i"), {"i": user_id})


def test_serialization_failure_is_transient(pg: Engine) -> None:
    """40001: a SERIALIZABLE transaction updating a row changed since its snapshot."""
    user_id = new_user(pg)
    with pg.connect() as first, pg.connect() as second:
        second = second.execution_options(isolation_level="SERIALIZABLE")
        second.execute(text("SELECT 1"))  # takes the snapshot
        touch(first, user_id)
        first.commit()
        error = raised(lambda: touch(second, user_id))
    assert sqlstate(error) == "40001"
    assert error in TRANSIENT_ERRORS


def test_deadlock_is_transient(pg: Engine) -> None:
    """40P01: two transactions locking two rows in opposite orders."""
    a, b = new_user(pg), new_user(pg)
    errors: list[sa_exc.DBAPIError] = []

    def update_rolling_back_on_error(connection: Connection, user_id: int) -> None:
        try:
            touch(connection, user_id)
        except sa_exc.DBAPIError as exc:
            errors.append(exc)
            connection.rollback()

    with pg.connect() as first, pg.connect() as second, pg.connect() as watcher:
        for connection in (first, second):
            connection.execute(text("SET deadlock_timeout = '100ms'"))
        touch(first, a)
        touch(second, b)
        first_pid = first.scalar(text("SELECT pg_backend_pid()"))
        blocked = threading.Thread(target=update_rolling_back_on_error, args=(first, b))
        blocked.start()

        def first_waits_for_a_lock() -> bool:
            query = text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid")
            found = bool(watcher.scalar(query, {"pid": first_pid}) == "Lock")
            watcher.rollback()  # a fresh snapshot of pg_stat_activity each time
            return found

        proj.jobs.testing.wait_for(first_waits_for_a_lock)
        update_rolling_back_on_error(second, a)
        blocked.join(timeout=30)
    assert [sqlstate(e) for e in errors] == ["40P01"]
    assert errors[0] in TRANSIENT_ERRORS


def test_lock_not_available_is_transient(pg: Engine) -> None:
    """55P03: SELECT ... FOR UPDATE NOWAIT on a row another transaction holds."""
    user_id = new_user(pg)
    query = text("SELECT id FROM users WHERE id = :i FOR UPDATE NOWAIT")
    with pg.connect() as holder, pg.connect() as other:
        holder.execute(query, {"i": user_id})
        error = raised(lambda: other.execute(query, {"i": user_id}))
    assert sqlstate(error) == "55P03"
    assert error in TRANSIENT_ERRORS


def test_terminated_connection_is_transient(pg: Engine) -> None:
    """A connection the server ends (pg_terminate_backend) fails its next statement
    with an invalidated connection or SQLSTATE 57P01/08xxx."""
    with pg.connect() as victim, pg.connect() as admin:
        pid = victim.scalar(text("SELECT pg_backend_pid()"))
        assert admin.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        error = raised(lambda: victim.execute(text("SELECT 1")))
    code = sqlstate(error) or ""
    assert error.connection_invalidated or code == "57P01" or code.startswith("08")
    assert error in TRANSIENT_ERRORS


def test_refused_connection_is_transient(pg: Engine) -> None:
    """A database that cannot be reached (nothing listening) may come back."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        url = pg.url.set(host="127.0.0.1", port=closed.getsockname()[1])
        unreachable = create_engine(url, poolclass=NullPool)
        error = raised(unreachable.connect)
    assert isinstance(error, sa_exc.OperationalError)
    assert error in TRANSIENT_ERRORS


@pytest.mark.parametrize(
    ("statement", "code", "kind"),
    [
        (
            "INSERT INTO users (email, created_at) SELECT email, now() FROM users LIMIT 1",
            "23505",
            sa_exc.IntegrityError,
        ),
        ("SELECT 1 / 0", "22012", sa_exc.DataError),
        ("SELECT * FROM no_such_table", "42P01", sa_exc.ProgrammingError),
    ],
    ids=["unique-violation", "division-by-zero", "undefined-table"],
)
def test_bad_statements_are_not_transient(
    pg: Engine, statement: str, code: str, kind: type[sa_exc.DBAPIError]
) -> None:
    """Integrity, data and programming errors fail the same way every time."""
    new_user(pg)
    with pg.connect() as connection:
        error = raised(lambda: connection.execute(text(statement)))
    assert isinstance(error, kind) and sqlstate(error) == code
    assert error not in TRANSIENT_ERRORS


def test_sqlite_busy_is_transient(sqlite: Engine) -> None:
    """SQLITE_BUSY: a second writer while another holds the write lock."""
    with sqlite.connect() as holder, sqlite.connect() as other:
        holder.exec_driver_sql("BEGIN IMMEDIATE")
        error = raised(lambda: other.exec_driver_sql("BEGIN IMMEDIATE"))
        holder.rollback()
    assert getattr(error.orig, "sqlite_errorcode", None) == 5
    assert error in TRANSIENT_ERRORS


def test_sqlite_busy_snapshot_is_transient(sqlite: Engine) -> None:
    """SQLITE_BUSY_SNAPSHOT: in WAL mode, a read transaction that wants to write
    after another connection committed (extended code 517, "database is locked")."""
    insert = text("INSERT INTO users (email, created_at) VALUES (:e, '2026-01-01')")
    with sqlite.connect() as reader, sqlite.connect() as writer:
        assert reader.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        reader.exec_driver_sql("BEGIN")
        reader.exec_driver_sql("SELECT count(*) FROM users").scalar()
        writer.execute(insert, {"e": f"writer-{uuid.uuid4().hex}@example.com"})
        writer.commit()
        error = raised(lambda: reader.execute(insert, {"e": f"r-{uuid.uuid4().hex}@example.com"}))
        reader.rollback()
    assert getattr(error.orig, "sqlite_errorcode", None) == 517
    assert error in TRANSIENT_ERRORS


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        (
            "INSERT INTO users (id, email, created_at) SELECT id, email, created_at FROM users "
            "LIMIT 1",
            sa_exc.IntegrityError,
        ),
        ("SELECT * FROM no_such_table", sa_exc.OperationalError),
    ],
    ids=["unique-violation", "undefined-table"],
)
def test_sqlite_bad_statements_are_not_transient(
    sqlite: Engine, statement: str, kind: type[sa_exc.DBAPIError]
) -> None:
    """On SQLite an OperationalError is not transient by its class alone."""
    with sqlite.begin() as connection:
        connection.execute(
            text("INSERT INTO users (email, created_at) VALUES (:e, '2026-01-01')"),
            {"e": f"sqlite-{uuid.uuid4().hex}@example.com"},
        )
    with sqlite.connect() as connection:
        error = raised(lambda: connection.execute(text(statement)))
    assert isinstance(error, kind)
    assert error not in TRANSIENT_ERRORS
