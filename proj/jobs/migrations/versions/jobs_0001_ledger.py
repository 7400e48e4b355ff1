"""The job ledger: the jobs table, its indexes and (on PostgreSQL) the NOTIFY
that wakes the relay.

A database whose jobs table an earlier proj made (in the application's own
history) is adopted as it is.

Revision ID: jobs_0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0001"
down_revision = None
branch_labels = ("proj_jobs",)
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)
UNPUBLISHED = sa.text("published_at IS NULL")
NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION proj_jobs_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('proj_jobs', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF published_at ON jobs
FOR EACH ROW WHEN (NEW.published_at IS NULL) EXECUTE FUNCTION proj_jobs_notify()
"""


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("jobs"):
        return
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("kwargs", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("available_at", TIMESTAMP, nullable=False),
        sa.Column("published_at", TIMESTAMP, nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("progress", sa.Float(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index("ix_jobs_state_created_at", "jobs", ["state", "created_at"])
    op.create_index(
        "ix_jobs_unpublished",
        "jobs",
        ["created_at"],
        postgresql_where=UNPUBLISHED,
        sqlite_where=UNPUBLISHED,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_FUNCTION)
        op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS jobs_notify ON jobs")
        op.execute("DROP FUNCTION IF EXISTS proj_jobs_notify()")
    op.drop_table("jobs")
