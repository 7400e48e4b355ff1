"""proj.jobs: background work for Flask + SQLAlchemy on Celery, correct by default.

Importing it starts nothing; ``Jobs(celery_app, database_url=...)`` installs it
onto one Celery app, ``jobs.init_app(flask_app, db)`` onto one Flask app::

    celery_app = Celery("shop", broker=...)
    jobs = Jobs(celery_app, database_url=...)
    jobs.init_app(flask_app, db)

    @celery_app.task(base=SqlAlchemyTask, bind=True)
    @retry_on(TRANSIENT_ERRORS, max_retries=5)
    def pay(self, order_id): ...
"""

from __future__ import annotations

from proj.jobs.canvas import enqueue_on_commit
from proj.jobs.clock import UtcDateTime, utcnow
from proj.jobs.context import system_scope
from proj.jobs.engine import engine_options
from proj.jobs.errors import (
    ClaimTakenBack,
    ConfigurationError,
    JobCancelled,
    NotInstalledError,
    ProjError,
    TaskArgumentError,
)
from proj.jobs.extension import Jobs
from proj.jobs.models import MAX_PRIORITY, NAMING_CONVENTION, TENANT_LEDGER_TABLES, Job, State
from proj.jobs.retry import TRANSIENT_ERRORS, retry_on
from proj.jobs.settings import JobsSettings
from proj.jobs.task import SqlAlchemyTask, shared_task

__all__ = [
    "MAX_PRIORITY",
    "NAMING_CONVENTION",
    "TENANT_LEDGER_TABLES",
    "TRANSIENT_ERRORS",
    "ClaimTakenBack",
    "ConfigurationError",
    "Job",
    "JobCancelled",
    "Jobs",
    "JobsSettings",
    "NotInstalledError",
    "ProjError",
    "SqlAlchemyTask",
    "State",
    "TaskArgumentError",
    "UtcDateTime",
    "engine_options",
    "enqueue_on_commit",
    "retry_on",
    "shared_task",
    "system_scope",
    "utcnow",
]
