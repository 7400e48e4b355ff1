"""The Celery resource: ``app``, configured from ``celeryconfig`` and the environment.

``celery -A proj worker`` and ``celery -A proj beat`` find ``app`` through
``proj/__init__.py``. The worker hooks proj needs (fork safety, configuration
checks, recording messages that cannot be run) are connected here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu.message import Message
from sqlalchemy import orm

from proj import db
from proj.config import Settings, load_settings
from proj.deadletter import record_message
from proj.errors import ConfigurationError
from proj.relay import RelayStep
from proj.safety import check_configuration
from proj.sqlite_forks import install_fork_gate


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (default: the environment's).

    proj's tasks are shared tasks, so they are registered on every app made here.
    """
    settings = settings or load_settings()
    celery_app = Celery(
        "proj",
        task_cls="proj.task:SqlAlchemyTask",
        include=["proj.tasks", "proj.maintenance"],
        set_as_current=False,
    )
    celery_app.config_from_object("celeryconfig")
    celery_app.conf.update(settings.celery_connection())
    celery_app.steps["worker"].add(RelayStep)
    return celery_app


app = create_app()
"""proj's Celery app (``celery -A proj``)."""
# The default in every thread (Flask serves requests on threads of its own), so
# shared tasks enqueue through this app, never Celery's unconfigured default.
app.set_default()
app.set_current()


# A prefork worker's children must be able to write the embedded setup's
# SQLite files: no fork while another thread of the worker uses one.
install_fork_gate()


@signals.worker_process_init.connect
def _forget_parent_connections(**_: Any) -> None:
    db.dispose_after_fork()


@signals.worker_init.connect
def _configure_mappers(**_: Any) -> None:
    # Before the pool forks and the relay thread starts: a child forked while
    # another thread configures the mappers would wait for their lock forever.
    orm.configure_mappers()


@signals.import_modules.connect
def _make_schedule_folder(sender: Celery, **_: Any) -> None:
    # Sent as worker and beat start, before beat opens its schedule file
    # (beat_init comes after that, too late to make the folder).
    Path(sender.conf.beat_schedule_filename).parent.mkdir(parents=True, exist_ok=True)


@signals.worker_init.connect
@signals.beat_init.connect
def _refuse_bad_configuration(sender: Any, **_: Any) -> None:
    try:
        check_configuration(sender.app)
    except ConfigurationError as exc:
        # Celery logs and swallows a receiver's Exception; SystemExit stops it.
        raise SystemExit(f"proj: {exc}") from exc


@signals.task_unknown.connect
def _record_unknown(message: Message, exc: BaseException, **_: Any) -> None:
    record_message(message, "unknown-task", exc)


@signals.task_rejected.connect
def _record_rejected(message: Message, exc: BaseException | None, **_: Any) -> None:
    record_message(message, "rejected", exc)
