"""Each failed attempt kept (``job_attempts``), unique jobs (``unique_key``),
cancelling a running job (``cancel_requested_at``) and worker heartbeats
(``job_workers``).

Revision ID: jobs_0002
Revises: jobs_0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0002"
down_revision = "jobs_0001"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)
UNIQUE_WHILE = sa.text("unique_key IS NOT NULL AND state IN ('queued', 'retrying', 'running')")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("unique_key", sa.String(length=255), nullable=True))
        jobs.add_column(sa.Column("cancel_requested_at", TIMESTAMP, nullable=True))
    op.create_index(
        "uq_jobs_name_unique_key",
        "jobs",
        ["name", "unique_key"],
        unique=True,
        postgresql_where=UNIQUE_WHILE,
        sqlite_where=UNIQUE_WHILE,
    )
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_attempts")),
    )
    op.create_index(op.f("ix_job_attempts_job_id"), "job_attempts", ["job_id"])
    op.create_table(
        "job_workers",
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("beat_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("hostname", name=op.f("pk_job_workers")),
    )


def downgrade() -> None:
    op.drop_table("job_workers")
    op.drop_table("job_attempts")
    op.drop_index("uq_jobs_name_unique_key", table_name="jobs")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("cancel_requested_at")
        jobs.drop_column("unique_key")
