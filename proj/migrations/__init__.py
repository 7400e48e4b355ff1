"""Alembic migrations for proj's tables (``proj db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from proj.config import current_settings
from proj.db import make_sqlite_folder


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic's configuration for ``database_url`` (default: the settings')."""
    url = database_url or current_settings().database_url
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["database_url"] = url
    return config


def upgrade(database_url: str | None = None) -> None:
    """Migrate the database to the newest revision; doing it twice changes nothing."""
    config = alembic_config(database_url)
    make_sqlite_folder(config.attributes["database_url"])
    command.upgrade(config, "head")
