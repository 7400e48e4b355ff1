"""The reference application's database resource: the declarative ``Base``,
Flask-SQLAlchemy's ``db`` (the web tier), and, for tasks and scripts, the
task-scoped ``Session`` of the Celery app in use.

The web tier (``db``, sized by ``PROJ_WEB_POOL_SIZE``) and the worker tier
(proj.jobs's engine, ``PROJ_WORKER_POOL_SIZE``) have pools of their own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from celery._state import get_current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, MetaData, orm
from werkzeug.local import LocalProxy

import proj.celery  # noqa: F401  (proj's Celery app, the default one, has proj.jobs)
from proj.jobs import NAMING_CONVENTION, Jobs


class Base(orm.DeclarativeBase):
    """The declarative base of the reference application's models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


db = SQLAlchemy(model_class=Base)
"""Flask-SQLAlchemy on ``Base``: the web tier's engine, pool and request-scoped
``db.session`` (inside a task, the run's own session)."""


def jobs() -> Jobs:
    """proj.jobs as installed on the Celery app in use (``proj.celery.app``,
    or the one a test made current)."""
    return Jobs.of(get_current_app())


Session: orm.scoped_session[orm.Session] = LocalProxy(lambda: jobs().session)  # type: ignore[assignment]
"""The task-scoped session: inside a task run, the session of that run."""


def session_scope() -> AbstractContextManager[orm.Session]:
    """A session for scripts: commits on success, rolls back on error, closes."""
    return jobs().session_scope()


def worker_engine() -> Engine:
    """The worker tier's engine (made on first use in each process)."""
    return jobs().engine
