"""Each job's queue and priority; paused queues (``job_queue_pauses``); the
relay's index of owed jobs by priority, then due time.

Revision ID: jobs_0011
Revises: jobs_0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0011"
down_revision = "jobs_0010"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)
UNFINISHED = ("waiting", "queued", "running", "retrying")
OWED = "published_at IS NULL AND state IN ('queued', 'retrying')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
    # A job that has yet to finish keeps the queue its options name, if any
    # (one routed by its task's name alone stays None: it is never held).
    jobs = sa.table("jobs", sa.column("options", sa.JSON), sa.column("queue"), sa.column("state"))
    op.execute(
        jobs.update()
        .where(jobs.c.state.in_(UNFINISHED))
        .values(queue=jobs.c.options["queue"].as_string())
    )
    op.drop_index("ix_jobs_owed", table_name="jobs")
    owed = sa.text(OWED)
    op.create_index(
        "ix_jobs_owed",
        "jobs",
        ["priority", "available_at"],
        postgresql_where=owed,
        sqlite_where=owed,
    )
    op.create_table(
        "job_queue_pauses",
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("paused_at", TIMESTAMP, nullable=False),
        sa.Column("paused_by", sa.String(length=400), nullable=False),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_job_queue_pauses")),
    )


def downgrade() -> None:
    op.drop_table("job_queue_pauses")
    op.drop_index("ix_jobs_owed", table_name="jobs")
    owed = sa.text(OWED)
    op.create_index(
        "ix_jobs_owed", "jobs", ["available_at"], postgresql_where=owed, sqlite_where=owed
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
        batch.drop_column("queue")
