"""What proj.jobs's commands share: the ledger's database and session, the
application's installation, and the audit record of a command's change.

An application's command hands them over in ``click``'s context: its
database (:data:`DATABASE_URL`) and its installation (:data:`INSTALLATION`).
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from celery import Celery
from flask import current_app, has_app_context
from sqlalchemy import create_engine, orm, pool

from proj.jobs import audit, auth
from proj.jobs.engine import resolve_url
from proj.jobs.errors import ConfigurationError
from proj.jobs.extension import EXTENSION_KEY, Jobs
from proj.jobs.session import system_session
from proj.jobs.settings import JobsSettings

DATABASE_URL = "proj.jobs.database_url"
"""The key of ``click`` context's ``meta`` an application's command may set."""
INSTALLATION = "proj.jobs.installation"
"""The key of ``click`` context's ``meta`` where an application's command may
put a callable returning its :class:`~proj.jobs.Jobs`: the Celery app whose
broker, routes and queues the jobs commands use."""


def database_url() -> str:
    given = click.get_current_context().meta.get(DATABASE_URL)
    try:
        return resolve_url(given or JobsSettings.from_environ().database_url)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc


def installation() -> Jobs:
    """The installation the jobs commands route, publish and announce
    through: the one the application's command handed (:data:`INSTALLATION`),
    else the Flask app's (``flask jobs ...``), else one of the command's own.
    That one knows the broker from ``CELERY_BROKER_URL`` alone, not the
    application's routes, so it publishes nothing itself: what a retry
    queues again is owed, and the relay of the application's workers
    publishes it."""
    given: Callable[[], Jobs] | None = click.get_current_context().meta.get(INSTALLATION)
    if given is not None:
        return given()
    if has_app_context() and EXTENSION_KEY in current_app.extensions:
        found: Jobs = current_app.extensions[EXTENSION_KEY]
        return found
    try:
        settings = JobsSettings.from_environ(database_url=database_url(), outbox_fast_path=False)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    return Jobs(Celery("proj.jobs.cli", set_as_current=False), settings=settings)


@contextmanager
def ledger_session() -> Iterator[orm.Session]:
    """A session on the ledger that commits if the command succeeds; an
    :class:`~proj.jobs.auth.AuthError` becomes the command's error message."""
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with system_session(engine) as session:
            yield session
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()


def record(session: orm.Session, action: audit.Action, target: str, **detail: Any) -> None:
    """Record a command's change, with the login name it runs under."""
    try:
        user: str | None = getpass.getuser()
    except (KeyError, OSError):  # neither a login variable nor a passwd entry
        user = None
    detail = {**detail, "os_user": user}
    audit.record(session, action, actor=audit.CLI, target=target, detail=detail)
