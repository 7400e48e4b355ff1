"""The worker pool's connections. Against a server that drops them: one that
rested longer than ``PING_AFTER_IDLE`` is pinged and replaced before use, and
one back in use sooner is not pinged (the first statement meets the drop,
and the whole pool is replaced). And ``proj.jobs.engine.autocommit``: each statement
commits on its own, and the connection goes back to the pool transactional."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from proj.jobs import engine as db
from proj.jobs.engine import make_engine

if TYPE_CHECKING:
    from conftest import Stack


@pytest.fixture
def pool(stack: Stack) -> Iterator[Engine]:
    """An engine made as the worker tier's is, with a pool of two."""
    if not stack.on_postgres:
        pytest.skip("needs a server that can drop a connection: this stack runs SQLite")
    made = make_engine(stack.settings.database_url, 2, role="test")
    yield made
    made.dispose()


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT pg_backend_pid()")))


def terminate(engine: Engine, pid: int) -> None:
    admin = create_engine(engine.url, poolclass=NullPool)
    with admin.connect() as connection:
        assert connection.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()


def test_a_rested_connection_the_server_dropped_is_replaced(pool: Engine) -> None:
    first = backend_pid(pool)
    terminate(pool, first)
    time.sleep(db.PING_AFTER_IDLE + 0.2)

    second = backend_pid(pool)  # raises if the dead connection were used

    assert second != first
    assert pool.pool.checkedout() == 0


def test_a_connection_back_within_the_idle_limit_is_not_pinged(pool: Engine) -> None:
    first = backend_pid(pool)
    terminate(pool, first)

    with pytest.raises(sa_exc.DBAPIError) as raised:
        backend_pid(pool)

    assert raised.value.connection_invalidated
    assert backend_pid(pool) not in (first, 0)  # the pool was replaced


def rows_seen_elsewhere(engine: Engine) -> list[int]:
    other = create_engine(engine.url, poolclass=NullPool)
    with other.connect() as connection:
        seen = list(connection.scalars(text("SELECT n FROM autocommit_probe ORDER BY n")))
    other.dispose()
    return seen


def test_autocommit_commits_each_statement_and_gives_back_a_transactional_connection(
    pool: Engine,
) -> None:
    with pool.begin() as connection:
        connection.execute(text("CREATE TABLE autocommit_probe (n integer)"))
    try:
        with db.autocommit(pool) as connection:
            first = connection.scalar(text("SELECT pg_backend_pid()"))
            connection.execute(text("INSERT INTO autocommit_probe VALUES (1)"))
            assert rows_seen_elsewhere(pool) == [1]  # committed before the block ends

        with pool.connect() as connection:  # the same pooled connection
            assert connection.scalar(text("SELECT pg_backend_pid()")) == first
            connection.execute(text("INSERT INTO autocommit_probe VALUES (2)"))
            connection.rollback()

        assert rows_seen_elsewhere(pool) == [1]  # autocommit did not stay on
        assert pool.pool.checkedout() == 0
    finally:
        with pool.begin() as connection:
            connection.execute(text("DROP TABLE autocommit_probe"))
