"""proj: background work for Flask + SQLAlchemy applications on Celery, correct by default.

``app`` is the Celery app, so ``celery -A proj worker`` finds it.
"""

from __future__ import annotations

from proj.celery import app
from proj.db import Base, Session, session_scope
from proj.errors import ConfigurationError, ProjError, TaskArgumentError
from proj.retry import TRANSIENT_ERRORS, retry_on
from proj.task import SqlAlchemyTask

__all__ = [
    "TRANSIENT_ERRORS",
    "Base",
    "ConfigurationError",
    "ProjError",
    "Session",
    "SqlAlchemyTask",
    "TaskArgumentError",
    "app",
    "retry_on",
    "session_scope",
]
