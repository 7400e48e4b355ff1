"""The job ledger; dead letters become its failed rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
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
    jobs = op.create_table(
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

    dead_letters = sa.table(
        "dead_letters",
        sa.column("id", sa.Integer()),
        sa.column("task_name", sa.String()),
        sa.column("task_id", sa.String()),
        sa.column("reason", sa.String()),
        sa.column("arguments", sa.JSON()),
        sa.column("exception", sa.Text()),
        sa.column("traceback", sa.Text()),
        sa.column("attempts", sa.Integer()),
        sa.column("failed_at", TIMESTAMP),
    )
    query = sa.select(dead_letters).order_by(dead_letters.c.id)
    letters = op.get_bind().execute(query).mappings()
    seen: set[str] = set()
    rows = []
    for letter in letters:
        job_id = letter["task_id"] or f"dead-letter-{letter['id']}"
        if job_id in seen:
            job_id = f"{job_id}-{letter['id']}"
        seen.add(job_id)
        arguments = letter["arguments"] or {}
        rows.append(
            {
                "id": job_id,
                "name": letter["task_name"],
                "args": arguments.get("args", []) if isinstance(arguments, dict) else [],
                "kwargs": arguments.get("kwargs", {}) if isinstance(arguments, dict) else {},
                "options": {"unrunnable_message": {"reason": letter["reason"]}}
                if letter["reason"] not in ("failed", "unpublished")
                else {},
                "state": "failed",
                "attempts": letter["attempts"],
                "max_attempts": letter["attempts"],
                "created_at": letter["failed_at"],
                "available_at": letter["failed_at"],
                "published_at": letter["failed_at"],
                "finished_at": letter["failed_at"],
                "error": letter["exception"],
                "traceback": letter["traceback"],
            }
        )
    if rows:
        op.bulk_insert(jobs, rows)
    op.drop_table("dead_letters")


def downgrade() -> None:
    raise NotImplementedError("the job ledger replaced the dead letters; restore a backup")
