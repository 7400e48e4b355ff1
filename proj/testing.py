"""What tests of proj applications need: point proj at a test stack, run an
in-process worker, and check that nothing leaked.

proj's own tests use these; yours can too::

    celery_app = proj.testing.configure(load_settings(test_env))
    with proj.testing.worker(celery_app, pool="threads", concurrency=2):
        send_welcome.delay(user_id)
        proj.testing.wait_for(lambda: user_welcomed(user_id))
    assert proj.testing.checked_out() == 0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.worker import WorkController, state
from sqlalchemy import select

from proj import db
from proj.celery import create_app
from proj.config import Settings
from proj.db import session_scope
from proj.ledger import Job, State

T = TypeVar("T")


def configure(settings: Settings) -> Celery:
    """Point proj at ``settings``: the worker tier's database, and a new Celery
    app (returned) made current and default, so shared tasks publish through it."""
    db.configure(settings)
    celery_app = create_app(settings)
    celery_app.set_current()
    celery_app.set_default()
    return celery_app


@contextmanager
def worker(
    celery_app: Celery, *, pool: str = "solo", concurrency: int = 1, **options: Any
) -> Iterator[WorkController]:
    """Run a worker for ``celery_app`` in this process until the block ends.

    ``pool`` is ``solo`` or ``threads``; a prefork pool forks, so run
    ``celery -A proj worker`` as a subprocess for that.
    """
    with start_worker(
        celery_app,
        pool=pool,
        concurrency=concurrency,
        perform_ping_check=False,
        shutdown_timeout=60.0,
        loglevel="WARNING",
        **options,
    ) as running:
        with celery_app.connection_for_read() as connection:
            broadcasts = "fanout" in connection.transport.implements.exchange_type
        hostname = str(getattr(running, "hostname", ""))
        if broadcasts:
            # Ready means listening: the wake-up sent at the end is not lost.
            wait_for(lambda: celery_app.control.ping(destination=[hostname], timeout=0.5))
        yield running
        # Wake the worker's event loop, which may otherwise sleep seconds
        # before it notices it should stop.
        state.should_terminate = 0  # type: ignore[assignment]
        celery_app.control.broadcast("ping", reply=False, destination=[hostname])


def checked_out() -> int:
    """Connections of the worker tier's pool that are checked out right now."""
    engine = db.existing_worker_engine()
    pool: Any = engine.pool if engine is not None else None
    return int(pool.checkedout()) if hasattr(pool, "checkedout") else 0


def job(job_id: str) -> Job:
    """The job's ledger row as it is now (detached); fails if there is none."""
    with session_scope() as session:
        found = session.get(Job, job_id)
        assert found is not None, f"no ledger row for {job_id}"
        session.expunge(found)
        return found


def failed_jobs(job_id: str) -> list[Job]:
    """The ledger's ``failed`` row for ``job_id``, if there is one (detached)."""
    with session_scope() as session:
        query = select(Job).where(Job.id == job_id, Job.state == State.FAILED)
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def failed_job(job_id: str, *, timeout: float = 30.0) -> Job:
    """The ``failed`` row of ``job_id``, once written (Celery reports a task's
    FAILURE before it calls ``on_failure``, which writes the row)."""
    [job] = wait_for(lambda: failed_jobs(job_id), timeout=timeout)
    return job


def wait_for(condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Call ``condition`` until it returns something true; return that.

    Raises ``AssertionError`` after ``timeout`` seconds (the last value in the
    message), so a test waiting for an effect fails instead of hanging.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout:g} s")
        time.sleep(interval)
