"""Alembic migrations for the reference application's tables (``proj db upgrade``,
after the ledger's own, which live in proj.jobs)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from proj.config import current_settings
from proj.jobs import migrations as jobs_migrations


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic's configuration for ``database_url`` (default: the settings')."""
    url = database_url or current_settings().database_url
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["database_url"] = url
    return config


def upgrade(database_url: str | None = None) -> None:
    """Migrate the ledger, then the application's tables, to their newest
    revisions; doing it twice changes nothing."""
    url = database_url or current_settings().database_url
    jobs_migrations.upgrade(url)
    command.upgrade(alembic_config(url), "head")
