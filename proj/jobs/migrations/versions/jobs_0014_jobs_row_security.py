"""Row-level security on the ledger's ``jobs`` and ``job_attempts``
(PostgreSQL): a transaction sees and writes the jobs of its own tenant
(``proj.tenant``), and every job in the system scope (``proj.scope`` set to
``system``: the relay, the reconciler, claims, the console, operators'
commands; see :func:`proj.jobs.context.system_scope`). One with neither sees
the jobs of no tenant only. An attempt is visible with its job. ``FORCE``
binds the tables' owner too; superusers and ``BYPASSRLS`` roles still see
every row (``proj check`` says so).

Revision ID: jobs_0014
Revises: jobs_0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "jobs_0014"
down_revision = "jobs_0013"
branch_labels = None
depends_on = None

POLICY = "tenant_isolation"
SYSTEM = "current_setting('proj.scope', true) = 'system'"
SAME_TENANT = "tenant IS NOT DISTINCT FROM NULLIF(current_setting('proj.tenant', true), '')"
JOBS = f"{SYSTEM} OR {SAME_TENANT}"
# Subject to the policy on jobs: an attempt is seen where its job is.
ATTEMPTS = "EXISTS (SELECT 1 FROM jobs WHERE jobs.id = job_attempts.job_id)"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # no row-level security: the job API and the console filter
    for table, rule in (("jobs", JOBS), ("job_attempts", ATTEMPTS)):
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {POLICY} ON {table} USING ({rule}) WITH CHECK ({rule})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in ("job_attempts", "jobs"):
        op.execute(f"DROP POLICY {POLICY} ON {table}")
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
