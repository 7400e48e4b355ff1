"""Celery's own revoke and terminate (``celery control``, what Flower sends)
on ledger jobs, with real prefork workers: the ledger keeps them, so a
revoked job never runs, a worker restarted included, and a terminated run is
not retried."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from celery import Celery
from e2e_tasks import create_effects_table, effect_counts, jobs, record_effect, states
from subprocesses import Commands, e2e_env

from proj.db import session_scope, worker_engine
from proj.jobs import utcnow
from proj.jobs.models import State
from proj.jobs.reconciler import reconcile

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def broadcasting(stack: Stack, celery_app: Celery) -> Stack:
    """The stack, where the broker can broadcast (the embedded one cannot:
    ``celery control`` does not reach its workers)."""
    if stack.settings.embedded:
        pytest.skip("the embedded SQLite broker has no broadcast for celery control")
    celery_app.control.purge()
    create_effects_table(worker_engine())
    return stack


def control(stack: Stack, *args: str) -> str:
    """``celery -A proj control ARGS`` on the stack, as an operator types it."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "proj", "control", *args],
        env=e2e_env(stack.process_env()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_revoked_job_never_runs_even_after_a_restart(
    broadcasting: Stack, celery_app: Celery, commands: Commands
) -> None:
    """A job due in a few seconds, waiting in the ledger, is revoked with
    ``celery control revoke``: it ends ``cancelled`` and is never published.
    A new worker (which never heard the revoke) runs past its due time, and
    the reconciler runs: neither sends it, and it takes no effect."""
    run = uuid.uuid4().hex[:10]
    first = commands.worker(broadcasting.process_env())
    job_id = record_effect.apply_async_on_commit((run, 0), countdown=4)
    assert "revoked" in control(broadcasting, "revoke", job_id)
    assert first.until(lambda: states([job_id]) == Counter({State.CANCELLED: 1}))
    assert first.stop() == 0

    second = commands.worker(broadcasting.process_env())
    [job] = jobs([job_id])
    time.sleep(max(0.0, (job.available_at - utcnow()).total_seconds()) + 3)
    with session_scope() as session:
        reconcile(session, celery_app, stale_after=0)
    assert second.stop() == 0
    [job] = jobs([job_id])
    assert (job.state, job.published_at) == (State.CANCELLED, None)
    assert f"[{job_id}]" not in second.output()
    assert effect_counts(run) == Counter()


def test_a_terminated_run_ends_cancelled_and_is_not_retried(
    broadcasting: Stack, commands: Commands
) -> None:
    """``celery control terminate SIGTERM <id>`` on a job that is running: its
    child is killed, its transaction rolls back (no effect), and the job ends
    ``cancelled`` after one attempt, not retried as a lost worker's would be."""
    run = uuid.uuid4().hex[:10]
    worker = commands.worker(broadcasting.process_env())
    job_id = record_effect.apply_async_on_commit((run, 0, 20.0))
    worker.until(lambda: states([job_id]) == Counter({State.RUNNING: 1}))
    control(broadcasting, "terminate", "SIGTERM", job_id)
    worker.until(lambda: states([job_id]) == Counter({State.CANCELLED: 1}))
    worker.wait_for_output("Terminating")
    # Whatever the worker does with the killed child's message, the job stays
    # cancelled: give a redelivery time to be skipped.
    ok = worker.size()
    record_effect.apply_async_on_commit((run, 1))
    worker.until(lambda: effect_counts(run) == Counter({1: 1}))
    [job] = jobs([job_id])
    assert (job.state, job.attempts, job.error) == (State.CANCELLED, 1, "terminated")
    assert effect_counts(run) == Counter({1: 1})
    assert "Traceback" not in worker.output(ok)
