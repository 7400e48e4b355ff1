"""The audit trail (``proj_audit``): who retried or cancelled jobs, signed in
or out, or changed a token or an account; when, from where, and what.

Revision ID: jobs_0010
Revises: jobs_0009
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0010"
down_revision = "jobs_0009"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "proj_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("actor", sa.String(length=400), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=400), nullable=True),
        sa.Column("tenant", sa.String(length=64), nullable=True),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proj_audit")),
    )
    op.create_index(op.f("ix_proj_audit_at"), "proj_audit", ["at"])
    op.create_index("ix_proj_audit_tenant_id", "proj_audit", ["tenant", "id"])


def downgrade() -> None:
    op.drop_index("ix_proj_audit_tenant_id", table_name="proj_audit")
    op.drop_index(op.f("ix_proj_audit_at"), table_name="proj_audit")
    op.drop_table("proj_audit")
