"""Console sessions that end on the server (``proj_accounts.session_nonce``),
and tokens that may expire and show when they were last used
(``proj_api_tokens.expires_at``, ``last_used_at``).

Revision ID: jobs_0005
Revises: jobs_0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0005"
down_revision = "jobs_0004"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Null until the account next signs in: the sessions it has now end.
    with op.batch_alter_table("proj_accounts") as accounts:
        accounts.add_column(sa.Column("session_nonce", sa.String(length=64), nullable=True))
    with op.batch_alter_table("proj_api_tokens") as tokens:
        tokens.add_column(sa.Column("expires_at", TIMESTAMP, nullable=True))
        tokens.add_column(sa.Column("last_used_at", TIMESTAMP, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("proj_api_tokens") as tokens:
        tokens.drop_column("last_used_at")
        tokens.drop_column("expires_at")
    with op.batch_alter_table("proj_accounts") as accounts:
        accounts.drop_column("session_nonce")
