"""Alembic's entry point for the ledger's history (its own version table)."""

from __future__ import annotations

from alembic import context

import proj.jobs.audit  # its table is the ledger's too
import proj.jobs.auth  # noqa: F401  (its tables are the ledger's too)
from proj.jobs.migrations import VERSION_TABLE
from proj.jobs.models import LedgerBase

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=LedgerBase.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=context.config.attributes["own_transactions"],
)
with context.begin_transaction():
    context.run_migrations()
