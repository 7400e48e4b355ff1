"""Rate limits shared by every worker: each job's ``rate_key``,
``rate_limit`` and ``rate_period``, an index of the rate-limited jobs by key
and state, and the starts that count against each key (``job_rate_starts``).

Revision ID: jobs_0013
Revises: jobs_0012
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0013"
down_revision = "jobs_0012"
branch_labels = None
depends_on = None

RATED = "rate_key IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rate_key", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("rate_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rate_period", sa.Float(), nullable=True))
    op.create_index(
        "ix_jobs_rate_key",
        "jobs",
        ["rate_key", "state"],
        postgresql_where=sa.text(RATED),
        sqlite_where=sa.text(RATED),
    )
    op.create_table(
        "job_rate_starts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_rate_starts")),
    )
    op.create_index("ix_job_rate_starts_key_until", "job_rate_starts", ["key", "until"])


def downgrade() -> None:
    op.drop_table("job_rate_starts")
    op.drop_index("ix_jobs_rate_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("rate_period")
        batch.drop_column("rate_limit")
        batch.drop_column("rate_key")
