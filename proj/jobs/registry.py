"""Which :class:`~proj.jobs.Jobs` is installed on which Celery app.

Tasks, the worker's steps, beat's scheduler and the dead-letter consumer find
their installation through the Celery app they run for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery

from proj.jobs.errors import NotInstalledError

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs

ATTRIBUTE = "proj_jobs"
"""The Celery app's attribute holding its installation (the app and its
installation refer to each other, and go together)."""


def install(celery_app: Celery, jobs: Jobs) -> None:
    """Make ``jobs`` the installation of ``celery_app``."""
    setattr(celery_app, ATTRIBUTE, jobs)


def jobs_of(celery_app: Celery) -> Jobs:
    """The :class:`Jobs` installed on ``celery_app``; :class:`NotInstalledError` if none."""
    try:
        jobs: Jobs = getattr(celery_app, ATTRIBUTE)
        return jobs
    except AttributeError:
        raise NotInstalledError(
            f"Celery app {celery_app.main!r} has no proj.jobs: "
            "call Jobs(celery_app, database_url=...) where the app is made."
        ) from None
