"""Stopping workers: the main process killed -9 mid-drain, and SIGTERM with
tasks running (the soft shutdown's grace, then the hand-back). Each test runs
workers of its own (no other worker consumes meanwhile)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

import psutil
import pytest
from celery import Celery
from e2e_tasks import (
    create_effects_table,
    effect_counts,
    jobs,
    record_effect,
    slow_first_run,
    states,
)
from subprocesses import Commands

from proj.db import session_scope, worker_engine
from proj.jobs import Jobs
from proj.jobs.models import State

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e


def tag() -> str:
    return uuid.uuid4().hex[:10]


def enqueue(run: str, count: int, seconds: float) -> list[str]:
    with session_scope() as session:
        return [
            record_effect.apply_async_on_commit((run, n, seconds), session=session)
            for n in range(count)
        ]


def test_the_main_process_killed_mid_drain_loses_and_repeats_nothing(
    stack: Stack, celery_app: Celery, commands: Commands
) -> None:
    """200 jobs; while a worker drains them, its main process is killed with
    SIGKILL (its children follow). A new worker starts; the reconciler (run
    here every second, with ``PROJ_STALE_AFTER`` at 3 s) takes back what the
    dead worker held, as its heartbeat has stopped: every job ends
    ``succeeded`` with its effect once, none is left ``running``."""
    if not stack.on_postgres:
        pytest.skip("the embedded broker's file is left locked by a killed process")
    create_effects_table(worker_engine())
    env = stack.process_env(PROJ_HEARTBEAT_INTERVAL="1")
    first = commands.worker(env)
    run = tag()
    job_ids = enqueue(run, 200, 0.2)
    first.until(lambda: states(job_ids)[State.SUCCEEDED] >= 40, timeout=60)
    family = first.children()
    os.kill(first.pid, signal.SIGKILL)
    first.popen.wait(timeout=10)
    _, alive = psutil.wait_procs(family, timeout=10)
    for child in alive:  # orphans that did not notice: the machine went down
        child.kill()
    cut_off = states(job_ids)
    assert cut_off[State.SUCCEEDED] < 200, "the drain was over before the kill"

    jobs_settings = Jobs.of(celery_app).settings
    Jobs.of(celery_app).settings = replace(jobs_settings, stale_after=3.0)
    second = commands.worker(env)
    try:

        def drained() -> bool:
            celery_app.tasks["proj.reconcile_jobs"].apply().get()
            time.sleep(1)
            return states(job_ids) == Counter({State.SUCCEEDED: 200})

        second.until(drained, timeout=120)
    finally:
        Jobs.of(celery_app).settings = jobs_settings
    assert effect_counts(run) == Counter(dict.fromkeys(range(200), 1))
    assert second.popen.poll() is None


def test_sigterm_lets_short_jobs_finish_and_hands_long_ones_back(
    stack: Stack, celery_app: Celery, commands: Commands
) -> None:
    """SIGTERM to a worker run with ``REMAP_SIGTERM=SIGQUIT`` and a 3 s grace
    (``PROJ_SHUTDOWN_GRACE``), while it runs a 1 s job and a 60 s one: the
    short one finishes; the long one is cut off when the grace ends and its
    job goes back to ``retrying`` at once (not ``running``). A new worker
    runs it again; each job takes effect once."""
    if not stack.on_postgres:
        pytest.skip("the embedded broker's file is left locked by a cut-off child")
    create_effects_table(worker_engine())
    env = stack.process_env(REMAP_SIGTERM="SIGQUIT", PROJ_SHUTDOWN_GRACE="3")
    first = commands.worker(env)
    run = tag()
    with session_scope() as session:
        short = slow_first_run.apply_async_on_commit((run, 0, 1.0), session=session)
        long = slow_first_run.apply_async_on_commit((run, 1, 60.0), session=session)
    first.until(lambda: states([short, long]) == Counter({State.RUNNING: 2}), timeout=30)
    assert first.stop(signal.SIGTERM, timeout=30) == 0
    after = {job.id: job for job in jobs([short, long])}
    assert (after[short].state, after[short].attempts) == (State.SUCCEEDED, 1)
    assert after[long].state == State.RETRYING
    second = commands.worker(env)
    second.until(lambda: states([short, long]) == Counter({State.SUCCEEDED: 2}), timeout=60)
    assert effect_counts(run) == Counter({0: 1, 1: 1})
    assert [job.attempts for job in jobs([long])] == [2]
