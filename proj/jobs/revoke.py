"""Celery's own revoke, kept by the ledger.

``celery control revoke`` (and Flower's revoke, and ``app.control.revoke``)
tells every worker to discard a task id, in memory: a worker restarted
forgets it, and the reconciler, which sees the job still waiting, would send
it again. So each worker of an app proj is installed on writes the revoke to
the ledger as it receives it, before Celery's own handling:

- a waiting job ends ``cancelled``, and is never published or run again (a
  copy still in the broker is skipped at claim);
- a running job is asked to stop (:meth:`~proj.jobs.SqlAlchemyTask.check_cancelled`),
  as proj's own cancel asks it; with ``terminate`` (``celery control
  terminate``) it ends ``cancelled`` at once, so the run Celery kills is not
  retried, and a run that is not killed (the thread pool cannot kill) cannot
  commit (its completion is fenced by its claim).

Every worker receives the broadcast and writes the same rows: doing it twice
changes nothing. Revokes by stamped headers are not recorded.

The other way round, proj's own cancel (the job API, the console) is told
as Celery tells a revoke: a ``task-revoked`` event (:func:`announce`), so
Flower and ``celery events`` show the job revoked rather than waiting or
started for ever.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Iterable
from typing import Any

from celery.utils.functional import maybe_list
from celery.worker.control import Panel

from proj.jobs import ledger
from proj.jobs.errors import NotInstalledError
from proj.jobs.registry import jobs_of
from proj.jobs.session import system_session

logger = logging.getLogger(__name__)

WRAPPED = "__proj_revoke__"
"""Marks a control command this module wrapped (installed once a process)."""


def install() -> None:
    """Record ``revoke`` and ``terminate`` control commands in the ledger (see
    the module), in this process, for every app proj is installed on."""
    celery_revoke, celery_terminate = Panel.data["revoke"], Panel.data["terminate"]
    if getattr(celery_revoke, WRAPPED, False):
        return

    @functools.wraps(celery_revoke)
    def recorded_revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> Any:
        record(state.app, maybe_list(task_id) or (), terminate=terminate)
        return celery_revoke(state, task_id, terminate=terminate, signal=signal, **kwargs)

    @functools.wraps(celery_terminate)
    def recorded_terminate(state: Any, signal: Any, task_id: Any, **kwargs: Any) -> Any:
        record(state.app, maybe_list(task_id) or (), terminate=True)
        return celery_terminate(state, signal, task_id, **kwargs)

    for name, command in (("revoke", recorded_revoke), ("terminate", recorded_terminate)):
        setattr(command, WRAPPED, True)
        Panel.data[name] = command


def record(celery_app: Any, job_ids: Iterable[str], *, terminate: bool) -> None:
    """Write a revoke of ``job_ids`` to the ledger of ``celery_app``'s
    installation (nothing where proj is not installed). Never raises: the
    revoke still happens in memory, as Celery does it."""
    ids = [str(job_id) for job_id in job_ids]
    try:
        jobs = jobs_of(celery_app)
    except NotInstalledError:
        return
    try:
        with system_session(jobs.engine) as session:
            ledger.revoke(session, ids, terminate=terminate)
    except Exception:
        logger.exception("revoke of %s not recorded in the ledger", ", ".join(ids))


def announce(celery_app: Any, job_ids: Iterable[str]) -> None:
    """Send a ``task-revoked`` event for each of ``job_ids`` (cancelled by
    proj): what Flower and ``celery events`` listen to. Nothing where the
    broker cannot broadcast (the embedded SQLite one); never raises."""
    ids = [str(job_id) for job_id in job_ids]
    if not ids:
        return
    try:
        with celery_app.connection_for_read() as connection:
            if "fanout" not in connection.transport.implements.exchange_type:
                return
        hostname = f"proj@{socket.gethostname()}"
        with celery_app.events.default_dispatcher(hostname=hostname) as dispatcher:
            for job_id in ids:
                dispatcher.send(
                    "task-revoked", uuid=job_id, terminated=False, signum=None, expired=False
                )
    except Exception:
        logger.exception("the revoke of %s was not announced", ", ".join(ids))
