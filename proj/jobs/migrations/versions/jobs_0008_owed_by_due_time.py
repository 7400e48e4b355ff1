"""Owed jobs found by their due time: the relay publishes a waiting job when
it falls due (a countdown or ETA of any length waits as its row), so the
index of rows it owes is ordered by ``available_at`` and holds only the
waiting ones.

Revision ID: jobs_0008
Revises: jobs_0007
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0008"
down_revision = "jobs_0007"
branch_labels = None
depends_on = None

OWED = "published_at IS NULL AND state IN ('queued', 'retrying')"


def upgrade() -> None:
    op.drop_index("ix_jobs_unpublished", table_name="jobs")
    op.create_index(
        "ix_jobs_owed",
        "jobs",
        ["available_at"],
        postgresql_where=sa.text(OWED),
        sqlite_where=sa.text(OWED),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_owed", table_name="jobs")
    op.create_index(
        "ix_jobs_unpublished",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )
