"""Celery's result tables, made by the migrations on PostgreSQL.

The reference application keeps Celery's results in its own database
(``CELERY_RESULT_BACKEND`` defaults to ``db+`` and ``DATABASE_URL``). Celery
makes the tables at a worker's start when they are missing, but the role the
application connects as in production may not create tables
(``deploy/postgres/init``): the role that owns the schema makes them here, as
Celery's own models define them, and the application's role gets their rows
through the owner's default privileges. Nothing is made on SQLite, where the
results have a file of their own (:func:`proj.config.load_settings`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op
from celery.backends.database.models import Task

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


RESULTS = Task.__table__.metadata
"""Celery's result models: its task and group tables and their sequences."""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # Tables Celery made itself before this revision stay as they are.
        RESULTS.create_all(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        RESULTS.drop_all(bind, checkfirst=True)
