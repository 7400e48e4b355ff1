"""Console accounts (``proj_accounts``) and API tokens (``proj_api_tokens``).

Revision ID: jobs_0003
Revises: jobs_0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0003"
down_revision = "jobs_0002"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "proj_accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proj_accounts")),
        sa.UniqueConstraint("email", name=op.f("uq_proj_accounts_email")),
    )
    op.create_table(
        "proj_api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proj_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_proj_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_proj_api_tokens_token_hash")),
    )


def downgrade() -> None:
    op.drop_table("proj_api_tokens")
    op.drop_table("proj_accounts")
