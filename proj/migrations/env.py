"""Alembic's entry point: runs the migrations on the URL proj hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import proj.models
import proj.payments  # noqa: F401  (their tables belong to Base.metadata)
from proj.db import Base
from proj.jobs.engine import resolve_url

url = resolve_url(context.config.attributes["database_url"])
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
