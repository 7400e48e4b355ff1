"""What a job carries from its enqueue (``jobs.context``), whose job it is
(``jobs.tenant``), and a token's tenant (``proj_api_tokens.tenant``).

Revision ID: jobs_0004
Revises: jobs_0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0004"
down_revision = "jobs_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("context", sa.JSON(), nullable=True))
        jobs.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
    with op.batch_alter_table("proj_api_tokens") as tokens:
        tokens.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("proj_api_tokens") as tokens:
        tokens.drop_column("tenant")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("tenant")
        jobs.drop_column("context")
