"""The reference application's Celery resource: ``app``, configured from
``proj.celeryconfig`` and the environment, with proj.jobs installed on it.

``celery -A proj worker`` and ``celery -A proj beat`` find ``app`` through
``proj/__init__.py``.
"""

from __future__ import annotations

from celery import Celery

from proj.config import Settings, current_settings
from proj.jobs import Jobs, SqlAlchemyTask


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with proj.jobs installed. The reference
    tasks are shared tasks, registered on every app made here."""
    celery_app: Celery = Celery(
        "proj", task_cls=SqlAlchemyTask, include=["proj.tasks"], set_as_current=False
    )
    celery_app.config_from_object("proj.celeryconfig")
    celery_app.conf.update(settings.celery_connection())
    Jobs(celery_app, settings=settings.jobs)
    return celery_app


app = make_celery(current_settings())
"""proj's Celery app (``celery -A proj``)."""
# The default in every thread (Flask serves requests on threads of its own), so
# shared tasks enqueue through this app, never Celery's unconfigured default.
app.set_default()
app.set_current()
