"""Users, invoices and gateway charges belong to a tenant; on PostgreSQL,
row-level security keeps each transaction to its tenant's rows.

Every table gets a ``tenant`` column (NULL: no tenant, as every existing row
is). A policy lets a transaction read and write only the rows whose tenant is
its own, ``proj.tenant`` (set with ``SET LOCAL`` by proj.jobs when a tenant is
current): a transaction with no tenant sees only the untenanted rows, so one
that forgot its tenant sees no tenant's rows at all. ``FORCE`` makes the
policy hold for the tables' owner too; superusers and ``BYPASSRLS`` roles
still see everything (``proj check`` says so once tenants are in use).

A later data migration that must see every tenant's rows has to run as such
a role (or once per tenant, with ``proj.tenant`` set).

An email signs up once per tenant: ``(tenant, email)`` is unique, and so is
``email`` among untenanted users.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("users", "invoices", "gateway_charges")
POLICY = "tenant_isolation"
SAME_TENANT = "tenant IS NOT DISTINCT FROM NULLIF(current_setting('proj.tenant', true), '')"
"""The rows a transaction may see and write. ``current_setting`` answers ''
rather than NULL once the setting was set in the session, hence NULLIF."""
UNTENANTED = sa.text("tenant IS NULL")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
    with op.batch_alter_table("users") as users:
        users.drop_constraint("uq_users_email", type_="unique")
        users.create_unique_constraint("uq_users_tenant_email", ["tenant", "email"])
    op.create_index(
        "uq_users_email_untenanted",
        "users",
        ["email"],
        unique=True,
        postgresql_where=UNTENANTED,
        sqlite_where=UNTENANTED,
    )
    if op.get_bind().dialect.name != "postgresql":
        return  # no row-level security: the application filters (proj.models)
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {POLICY} ON {table} USING ({SAME_TENANT}) WITH CHECK ({SAME_TENANT})"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP POLICY {POLICY} ON {table}")
            op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
            op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    op.drop_index("uq_users_email_untenanted", "users")
    with op.batch_alter_table("users") as users:
        users.drop_constraint("uq_users_tenant_email", type_="unique")
        users.create_unique_constraint("uq_users_email", ["email"])
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
