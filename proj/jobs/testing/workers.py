"""Real-worker helpers: an in-process worker, waiting
for a job's state, and checks that nothing leaked.

proj's own tests use these; yours can too::

    with proj.jobs.testing.worker(celery_app, pool="threads", concurrency=2):
        job_id = send_welcome.delay_on_commit(user_id)
        db.session.commit()
        proj.jobs.testing.wait_for_state(job_id, "succeeded")
    assert proj.jobs.testing.checked_out() == 0

Each helper takes the Celery app whose jobs it looks at, and defaults to
Celery's current app.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from celery import Celery
from celery._state import get_current_app
from celery.contrib.testing.worker import start_worker
from celery.worker import WorkController, state
from sqlalchemy import select

from proj.jobs.extension import Jobs
from proj.jobs.models import Job, State
from proj.jobs.session import system_session

T = TypeVar("T")


def _jobs(celery_app: Celery | None) -> Jobs:
    return Jobs.of(celery_app or get_current_app())


@contextmanager
def worker(
    celery_app: Celery, *, pool: str = "solo", concurrency: int = 1, **options: Any
) -> Iterator[WorkController]:
    """Run a worker for ``celery_app`` in this process until the block ends.

    ``pool`` is ``solo`` or ``threads``; a prefork pool forks, so run
    ``celery -A yourapp worker`` as a subprocess for that.
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


def checked_out(celery_app: Celery | None = None) -> int:
    """Connections of the worker tier's pool that are checked out right now."""
    jobs = _jobs(celery_app)
    pool: Any = jobs._engine.pool if jobs._engine is not None else None
    return int(pool.checkedout()) if hasattr(pool, "checkedout") else 0


def job(job_id: str, celery_app: Celery | None = None) -> Job:
    """The job's ledger row as it is now (detached); fails if there is none."""
    with system_session(_jobs(celery_app).engine) as session:  # whichever tenant's job
        found = session.get(Job, job_id)
        assert found is not None, f"no ledger row for {job_id}"
        session.expunge(found)
        return found


def failed_jobs(job_id: str, celery_app: Celery | None = None) -> list[Job]:
    """The ledger's ``failed`` row for ``job_id``, if there is one (detached)."""
    with system_session(_jobs(celery_app).engine) as session:  # whichever tenant's job
        query = select(Job).where(Job.id == job_id, Job.state == State.FAILED)
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def failed_job(job_id: str, *, timeout: float = 30.0, celery_app: Celery | None = None) -> Job:
    """The ``failed`` row of ``job_id``, once written (Celery reports a task's
    FAILURE before it calls ``on_failure``, which writes the row)."""
    [found] = wait_for(lambda: failed_jobs(job_id, celery_app), timeout=timeout)
    return found


def wait_for_state(
    job_id: str, *states: str, timeout: float = 30.0, celery_app: Celery | None = None
) -> Job:
    """The job's row once its state is one of ``states``."""

    def reached() -> Job | None:
        row = job(job_id, celery_app)
        return row if row.state in states else None

    return cast(Job, wait_for(reached, timeout=timeout))


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
