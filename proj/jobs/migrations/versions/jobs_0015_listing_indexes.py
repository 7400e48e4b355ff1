"""Indexes for the filtered lists of a big ledger: by tenant, by task and by
queue, each by state and newest first (``state, created_at, id``), so the job
API's and the console's filtered pages read about a page of rows at any size
(:mod:`proj.jobs.listing`); by end time, of the finished jobs only, for
the overview's last hour and pruning; and the ``jobs``
policy of ``jobs_0014`` written as a ``CASE`` (PostgreSQL), which lets the
planner guess that most rows pass it, and so walk an index to the first
page rather than sort every row first. Who sees which job is unchanged.

On PostgreSQL, run by ``proj jobs upgrade``, each is built ``CONCURRENTLY``
(outside a transaction): enqueues and claims go on while it is built. Run
inside an application's own migration transaction, the builds are plain
``CREATE INDEX`` and hold writes to ``jobs`` until that transaction ends.

Revision ID: jobs_0015
Revises: jobs_0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import time

from alembic import context, op
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

revision = "jobs_0015"
down_revision = "jobs_0014"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_jobs_tenant_state_created_at": ["tenant", "state", "created_at", "id"],
    "ix_jobs_name_state_created_at": ["name", "state", "created_at", "id"],
    "ix_jobs_queue_state_created_at": ["queue", "state", "created_at", "id"],
    "ix_jobs_finished_at": ["finished_at"],
}
PARTIAL = {"ix_jobs_finished_at": "finished_at IS NOT NULL"}
"""Rows an index leaves out: a job gets into it when it finishes."""
SYSTEM = "current_setting('proj.scope', true) = 'system'"
SAME_TENANT = "tenant IS NOT DISTINCT FROM NULLIF(current_setting('proj.tenant', true), '')"
POLICIES = {
    "upgrade": f"CASE WHEN {SYSTEM} THEN true ELSE {SAME_TENANT} END",
    "downgrade": f"{SYSTEM} OR {SAME_TENANT}",
}
LOCK_WAIT = "200ms"
"""How long the policy change waits for the table at a time: enqueues that
come meanwhile wait behind it, so no longer than this."""
LOCK_TRIES = 150
"""Times it tries, a fifth of a second apart (a minute or so in all)."""


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    if not postgresql or not context.config.attributes.get("own_transactions"):
        for name, columns in INDEXES.items():
            where = text(PARTIAL[name]) if name in PARTIAL else None
            op.create_index(name, "jobs", columns, postgresql_where=where, sqlite_where=where)
        if postgresql:
            _alter_policy(POLICIES["upgrade"])
        return
    with op.get_context().autocommit_block():
        for name, columns in INDEXES.items():
            # A build stopped halfway leaves an invalid index behind: built again.
            invalid = text(
                "SELECT 1 FROM pg_index WHERE indexrelid = to_regclass(:name) AND NOT indisvalid"
            )
            if op.get_bind().execute(invalid, {"name": name}).first():
                op.execute(f"DROP INDEX CONCURRENTLY {name}")
            only = f" WHERE {PARTIAL[name]}" if name in PARTIAL else ""
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} "
                f"ON jobs ({', '.join(columns)}){only}"
            )
        op.execute(f"SET lock_timeout = '{LOCK_WAIT}'")
        for attempt in range(1, LOCK_TRIES + 1):
            try:
                _alter_policy(POLICIES["upgrade"])
                break
            except OperationalError:
                if attempt == LOCK_TRIES:
                    raise
                time.sleep(0.2)
        op.execute("RESET lock_timeout")


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="jobs")
    if op.get_bind().dialect.name == "postgresql":
        _alter_policy(POLICIES["downgrade"])


def _alter_policy(rule: str) -> None:
    op.execute(f"ALTER POLICY tenant_isolation ON jobs USING ({rule}) WITH CHECK ({rule})")
