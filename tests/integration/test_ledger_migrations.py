"""The ledger's migrations on a real PostgreSQL: ``proj jobs upgrade`` builds
``jobs_0015``'s indexes concurrently (a build stopped halfway is built
again), an application's own migration transaction builds them in it, and
either way the ``jobs`` policy lets the same rows through.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest
import stacks
from sqlalchemy import Engine, create_engine, pool, text

from proj.jobs.engine import resolve_url
from proj.jobs.migrations import upgrade, upgrade_connection

NEW_INDEXES = {
    "ix_jobs_tenant_state_created_at": "(tenant, state, created_at, id)",
    "ix_jobs_name_state_created_at": "(name, state, created_at, id)",
    "ix_jobs_queue_state_created_at": "(queue, state, created_at, id)",
    "ix_jobs_finished_at": "(finished_at) WHERE (finished_at IS NOT NULL)",
}


@pytest.fixture
def database() -> Iterator[str]:
    with stacks.postgres_database() as url:
        yield url


def engine_of(url: str) -> Engine:
    return create_engine(resolve_url(url), poolclass=pool.NullPool)


def indexes(url: str) -> dict[str, tuple[bool, str]]:
    """Each of the new indexes on ``jobs``: whether it is valid, and its columns."""
    query = text(
        "SELECT c.relname, i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'jobs'::regclass"
    )
    with engine_of(url).connect() as connection:
        found = connection.execute(query).all()
    return {
        name: (valid, definition.rpartition(" USING btree ")[2])
        for name, valid, definition in found
        if name in NEW_INDEXES
    }


def policy(url: str) -> str:
    query = text(
        "SELECT pg_get_expr(polqual, polrelid) FROM pg_policy WHERE polrelid = 'jobs'::regclass"
    )
    with engine_of(url).connect() as connection:
        return str(connection.execute(query).scalar_one())


def test_upgrade_builds_the_list_indexes_and_rebuilds_one_left_invalid(database: str) -> None:
    upgrade(database)
    assert indexes(database) == {name: (True, columns) for name, columns in NEW_INDEXES.items()}
    assert policy(database).lstrip().startswith("CASE")
    # A concurrent build that failed leaves an invalid index of that name.
    raw = psycopg2.connect(database)
    raw.autocommit = True
    with raw.cursor() as cursor:
        cursor.execute("DROP INDEX ix_jobs_tenant_state_created_at")
        cursor.execute("UPDATE proj_jobs_alembic_version SET version_num = 'jobs_0014'")
        for job_id in ("a", "b"):
            cursor.execute(
                "INSERT INTO jobs (id, name, args, kwargs, options, state, attempts, "
                "max_attempts, created_at, available_at) VALUES (%s, 't', '[]', '{}', '{}', "
                "'succeeded', 1, 1, now(), now())",
                (job_id,),
            )
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cursor.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY ix_jobs_tenant_state_created_at ON jobs (name)"
            )
    raw.close()
    assert indexes(database)["ix_jobs_tenant_state_created_at"] == (False, "(name)")
    upgrade(database)
    assert indexes(database) == {name: (True, columns) for name, columns in NEW_INDEXES.items()}


def test_upgrade_inside_an_applications_transaction_builds_them_there(database: str) -> None:
    engine = engine_of(database)
    with engine.begin() as connection:
        upgrade_connection(connection)
        # Nothing is committed before the application's transaction is.
        with engine_of(database).connect() as other:
            assert other.execute(text("SELECT to_regclass('jobs')")).scalar() is None
    engine.dispose()
    assert indexes(database) == {name: (True, columns) for name, columns in NEW_INDEXES.items()}
    assert policy(database).lstrip().startswith("CASE")
