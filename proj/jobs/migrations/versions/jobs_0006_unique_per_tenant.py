"""Unique keys are each tenant's own: the index that keeps one waiting or
running job a task and key takes the job's tenant in (no tenant counts as
one tenant of its own).

Revision ID: jobs_0006
Revises: jobs_0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0006"
down_revision = "jobs_0005"
branch_labels = None
depends_on = None

UNIQUE_WHILE = "unique_key IS NOT NULL AND state IN ('queued', 'retrying', 'running')"


def upgrade() -> None:
    op.drop_index("uq_jobs_name_unique_key", table_name="jobs")
    op.create_index(
        "uq_jobs_name_tenant_unique_key",
        "jobs",
        ["name", sa.text("coalesce(tenant, '')"), "unique_key"],
        unique=True,
        postgresql_where=sa.text(UNIQUE_WHILE),
        sqlite_where=sa.text(UNIQUE_WHILE),
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_name_tenant_unique_key", table_name="jobs")
    op.create_index(
        "uq_jobs_name_unique_key",
        "jobs",
        ["name", "unique_key"],
        unique=True,
        postgresql_where=sa.text(UNIQUE_WHILE),
        sqlite_where=sa.text(UNIQUE_WHILE),
    )
