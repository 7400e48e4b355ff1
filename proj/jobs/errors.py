"""proj.jobs's exceptions.

Error tree::

    ProjError
    ├── ConfigurationError       a setting proj cannot run with
    ├── TaskArgumentError        a task argument that cannot cross the queue
    ├── NotInstalledError        a task or app that no ``Jobs`` was installed on
    ├── JobCancelled             raised in a running job someone asked to stop
    └── ClaimTakenBack           a run whose job was given to another run

Each class's docstring is its default message.
"""

from __future__ import annotations


class ProjError(Exception):
    """Something went wrong in proj."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(ProjError):
    """proj's configuration is not valid; fix the setting named and start again."""


class TaskArgumentError(ProjError):
    """Task arguments must be JSON values: pass the object's id, not the object."""


class NotInstalledError(ProjError):
    """This Celery app has no proj.jobs: call Jobs(celery_app, database_url=...) first."""


class JobCancelled(ProjError):
    """Someone asked this job to stop; it ends ``cancelled`` and its session rolls back."""


class ClaimTakenBack(ProjError):
    """This run's job was taken back and given to another run (the reconciler
    found its worker gone): the run's transaction rolls back, effects included."""
