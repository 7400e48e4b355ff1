"""Canvases on the ledger: a job may wait for the jobs before it
(``waiting``, ``parents_left``), belongs to a canvas (``canvas_id``), and
keeps its place in it (``graph``: parents, children, error callbacks).

Revision ID: jobs_0009
Revises: jobs_0008
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0009"
down_revision = "jobs_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("canvas_id", sa.String(length=255), nullable=True))
        batch.add_column(
            sa.Column("parents_left", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("graph", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_canvas_id", "jobs", ["canvas_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_canvas_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("graph")
        batch.drop_column("parents_left")
        batch.drop_column("canvas_id")
