"""The job ledger's schema: an Alembic history of its own, with its own
version table, so it never meets the application's ``alembic_version``.

``upgrade(url)`` (``proj jobs upgrade``) migrates the ledger alone; an
application's own Alembic environment can call :func:`upgrade_connection`
from its ``env.py`` (see the upgrading how-to in ``docs/``).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, pool

from proj.jobs.engine import make_sqlite_folder, resolve_url

VERSION_TABLE = "proj_jobs_alembic_version"
"""Where the ledger's revision is kept (the application's stays in ``alembic_version``)."""


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """Alembic's configuration for the ledger's history, on ``url`` or ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["database_url"] = url
    config.attributes["connection"] = connection
    # Alembic commits each migration on its own (a migration may build an
    # index concurrently, outside any transaction) unless the caller's
    # transaction holds them all.
    config.attributes["own_transactions"] = connection is None or not connection.in_transaction()
    return config


def upgrade(url: str) -> None:
    """Migrate the ledger on ``url`` to its newest revision, a migration a
    transaction (an index is built without holding enqueues on PostgreSQL);
    doing it twice changes nothing, and no other table is touched."""
    url = resolve_url(url)
    make_sqlite_folder(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            upgrade_connection(connection)
    finally:
        engine.dispose()


def upgrade_connection(connection: Connection) -> None:
    """Migrate the ledger on ``connection``: in its transaction if one is
    begun (the indexes of ``jobs_0015`` are then built holding writes to
    ``jobs``), else a transaction a migration."""
    command.upgrade(alembic_config(connection=connection), "head")
