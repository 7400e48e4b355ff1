"""When an invoice's receipt was mailed (``invoices.receipt_sent_at``): the
receipt step chained to a charge sends it once.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invoices") as invoices:
        invoices.add_column(sa.Column("receipt_sent_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("invoices") as invoices:
        invoices.drop_column("receipt_sent_at")
