"""(being written) metrics for proj.jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from proj.jobs.extension import Jobs


def install(jobs: Jobs) -> None:
    """Onto ``jobs.celery_app``, when ``Jobs(...)`` is made."""


def init_app(jobs: Jobs, flask_app: Flask) -> None:
    """Onto ``flask_app``, when ``jobs.init_app(flask_app, db)`` runs."""
