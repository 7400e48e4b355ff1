"""Console sign-in attempts counted in the database
(``proj_login_attempts``), so every web process shares one limit.

Revision ID: jobs_0007
Revises: jobs_0006
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0007"
down_revision = "jobs_0006"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "proj_login_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proj_login_attempts")),
    )
    op.create_index(
        "ix_proj_login_attempts_key_expires_at", "proj_login_attempts", ["key", "expires_at"]
    )
    op.create_index(
        op.f("ix_proj_login_attempts_expires_at"), "proj_login_attempts", ["expires_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_proj_login_attempts_expires_at"), table_name="proj_login_attempts")
    op.drop_index("ix_proj_login_attempts_key_expires_at", table_name="proj_login_attempts")
    op.drop_table("proj_login_attempts")
