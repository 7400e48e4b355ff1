"""Which :class:`~proj.jobs.Jobs` is installed on which Celery app.

Tasks, the worker's steps, beat's scheduler and the dead-letter consumer find
their installation through the Celery app they run for.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from celery import Celery

from proj.jobs.errors import NotInstalledError

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs

_installed: weakref.WeakKeyDictionary[Celery, Jobs] = weakref.WeakKeyDictionary()


def install(celery_app: Celery, jobs: Jobs) -> None:
    """Make ``jobs`` the installation of ``celery_app``."""
    _installed[celery_app] = jobs


def jobs_of(celery_app: Celery) -> Jobs:
    """The :class:`Jobs` installed on ``celery_app``; :class:`NotInstalledError` if none."""
    try:
        return _installed[celery_app]
    except KeyError:
        raise NotInstalledError(
            f"Celery app {celery_app.main!r} has no proj.jobs: "
            "call Jobs(celery_app, database_url=...) where the app is made."
        ) from None
