"""Dead letters become failed rows of the job ledger.

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
JOBS = sa.table(
    "jobs",
    sa.column("id", sa.String()),
    sa.column("name", sa.String()),
    sa.column("args", sa.JSON()),
    sa.column("kwargs", sa.JSON()),
    sa.column("options", sa.JSON()),
    sa.column("state", sa.String()),
    sa.column("attempts", sa.Integer()),
    sa.column("max_attempts", sa.Integer()),
    sa.column("created_at", TIMESTAMP),
    sa.column("available_at", TIMESTAMP),
    sa.column("published_at", TIMESTAMP),
    sa.column("finished_at", TIMESTAMP),
    sa.column("error", sa.Text()),
    sa.column("traceback", sa.Text()),
)


def upgrade() -> None:
    # The ledger's own migrations (proj.jobs) made the jobs table first.
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
        op.bulk_insert(JOBS, rows)
    op.drop_table("dead_letters")


def downgrade() -> None:
    raise NotImplementedError("the job ledger replaced the dead letters; restore a backup")
