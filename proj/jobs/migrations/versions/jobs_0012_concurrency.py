"""Concurrency limits per key: each job's ``concurrency_key`` and
``concurrency_limit``, and an index of the keyed jobs by key and state.

Revision ID: jobs_0012
Revises: jobs_0011
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0012"
down_revision = "jobs_0011"
branch_labels = None
depends_on = None

KEYED = "concurrency_key IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("concurrency_key", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("concurrency_limit", sa.Integer(), nullable=True))
    op.create_index(
        "ix_jobs_concurrency_key",
        "jobs",
        ["concurrency_key", "state"],
        postgresql_where=sa.text(KEYED),
        sqlite_where=sa.text(KEYED),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_concurrency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("concurrency_limit")
        batch.drop_column("concurrency_key")
