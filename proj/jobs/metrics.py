"""Prometheus metrics of proj.jobs: counted where things happen, in every
process that does them.

=====================================  =========  ===============================
metric                                 type       labels
=====================================  =========  ===============================
``proj_jobs_enqueued_total``           counter    ``task``
``proj_jobs_finished_total``           counter    ``task``, ``state``
``proj_jobs_retries_total``            counter    ``task``
``proj_job_run_duration_seconds``      histogram  ``task``
``proj_job_enqueue_to_start_seconds``  histogram  ``task``
``proj_outbox_relayed_total``          counter
=====================================  =========  ===============================

- *enqueued*: a ledger job when the transaction that wrote its row commits
  (one rolled back, or a savepoint of it, counts nothing; a ``unique`` key
  already held counts nothing; beat's runs count, in beat); a plain
  ``.delay()`` when its first message is published (its retries are
  published again and count as retries);
- *finished*: a run that ended the job ``succeeded``, ``failed`` (raised, used
  up its retries, or rejected its message) or ``cancelled`` (stopped as
  asked); *retries*: a run that ended in a retry. A delivery skipped because
  its job ran, runs or was cancelled elsewhere counts nothing;
- *run duration*: from the start of the run (before the ledger claim) to its
  end (after the commit), for every run counted above;
- *enqueue to start*: from when the job could start (its message's
  publication, or its ETA if later) to the start of the run. A job the
  relay publishes late (the broker was away) counts from that publication:
  the outbox's lag is ``proj_outbox_oldest_owed_age_seconds``;
- *relayed*: a job the relay published (its fast path had not), in the
  worker or ``proj relay`` that published it.

Runs are counted by Celery's ``task_prerun``/``task_postrun`` signals, for the
tasks of apps ``Jobs`` is installed on (eager runs left out); a run cut off
by its process's death (a killed child, a hard time limit) is not counted
(the ledger's gauges see its job). Labels are task names and states, never
arguments or ids.

With ``PROMETHEUS_MULTIPROC_DIR`` set when a process starts,
``prometheus_client`` keeps each process's values in a file of that folder,
and :func:`counted` reads them all: prefork children, web processes, the
relay and beat all count. The folder must be empty when the first process
starts (a file is never removed while its process lives). Files are named
by host and pid, not pid alone, so that containers (each with its own pids)
may share the folder. Without the variable, each process counts for itself.

With ``PROJ_METRICS_PORT`` set, each worker, beat and relay serves its own
process group's counts on that port (:mod:`proj.jobs.metrics_server`), for
deployments whose processes share no folder (pods): the group's main process
then counts in a folder of its own (:func:`count_in`) before it forks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from prometheus_client import REGISTRY, Counter, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proj.jobs import publisher
from proj.jobs.clock import parse_eta
from proj.jobs.errors import JobCancelled
from proj.jobs.metrics_files import process_naming
from proj.jobs.registry import ATTRIBUTE
from proj.jobs.worker import claim_of, is_ledger_job

if TYPE_CHECKING:
    from flask import Flask

    from proj.jobs.extension import Jobs

logger = logging.getLogger(__name__)

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable that turns multiprocess mode on (prometheus_client's)."""
PUBLISHED_HEADER = "proj_published_at"
"""The message header holding when it was published (Unix time)."""
RUN_KEY = "proj_metrics_run"
"""Where a counted run keeps, on its request, when it started and how long it waited."""

RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Seconds: a mail, a query, a report; up to the half hour of RabbitMQ's consumer timeout."""
WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""Seconds: an idle worker's pick-up, then backlogs of minutes and hours."""

SUCCEEDED, FAILED, CANCELLED, RETRIED = "succeeded", "failed", "cancelled", "retried"


class Meters:
    """The counters and histograms (one set a process, in ``REGISTRY``)."""

    def __init__(self) -> None:
        self.enqueued = Counter(
            "proj_jobs_enqueued_total", "Jobs enqueued (committed), by task.", ["task"]
        )
        self.finished = Counter(
            "proj_jobs_finished_total",
            "Runs that ended their job succeeded, failed or cancelled, by task and state.",
            ["task", "state"],
        )
        self.retries = Counter(
            "proj_jobs_retries_total", "Runs that ended in a retry, by task.", ["task"]
        )
        self.run_duration = Histogram(
            "proj_job_run_duration_seconds",
            "Seconds a run took, claim and commit included, by task.",
            ["task"],
            buckets=RUN_BUCKETS,
        )
        self.enqueue_to_start = Histogram(
            "proj_job_enqueue_to_start_seconds",
            "Seconds from when a job could start (published, or its ETA) to its run's start.",
            ["task"],
            buckets=WAIT_BUCKETS,
        )
        self.relayed = Counter(
            "proj_outbox_relayed_total", "Jobs the relay published (their fast path had not)."
        )


@cache
def meters() -> Meters:
    """This process's :class:`Meters`, made on first use (by :func:`install`)."""
    folder = os.environ.get(MULTIPROCESS_DIR)
    if folder:
        if counts_in_files():
            _name_files(Path(folder))
        else:
            logger.warning(
                "%s is set, but prometheus_client was imported before it was: this "
                "process's metrics stay in it (set it before the process starts)",
                MULTIPROCESS_DIR,
            )
    return Meters()


def counts_in_files() -> bool:
    """Whether values made in this process from now on are kept in files
    (multiprocess mode), rather than in memory."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _name_files(folder: Path) -> None:
    # Files named by host and pid: containers sharing the folder have pids of
    # their own, and two processes must never share a file.
    folder.mkdir(parents=True, exist_ok=True)
    values.ValueClass = values.MultiProcessValue(process_naming())  # type: ignore[no-untyped-call]


def count_in(folder: Path) -> None:
    """Keep values in files of ``folder`` from now on, in this process and
    those it forks (``PROMETHEUS_MULTIPROC_DIR`` names it). The meters are
    made again: what this process counted before is dropped (a worker
    counts nothing before it starts)."""
    os.environ[MULTIPROCESS_DIR] = str(folder)
    _name_files(folder)
    if meters.cache_info().currsize:
        for metric in vars(meters()).values():
            REGISTRY.unregister(metric)
        meters.cache_clear()
    meters()


def stop_counting_in(folder: Path) -> None:
    """Values made from now on stay in memory again (those made already
    keep their files, removed or not), and a process this one starts, or
    becomes (Celery's restart on SIGHUP execs), counts in memory too."""
    values.ValueClass = values.MutexValue
    if os.environ.get(MULTIPROCESS_DIR) == str(folder):
        del os.environ[MULTIPROCESS_DIR]


def counted() -> Collector:
    """What to report of the counters and histograms: every process's in
    multiprocess mode, else this process's (with the default registry's
    other metrics)."""
    folder = os.environ.get(MULTIPROCESS_DIR)
    if folder:
        return MultiProcessCollector(None, path=folder)  # type: ignore[no-untyped-call]
    return REGISTRY


_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
"""The Celery apps ``Jobs`` is installed on, in this process."""


def install(jobs: Jobs) -> None:
    """Count ``jobs.celery_app``'s jobs (connected once a process, whatever
    the number of installations)."""
    _apps.add(jobs.celery_app)
    meters()
    signals.before_task_publish.connect(_stamp, weak=False, dispatch_uid="proj.jobs.metrics.stamp")
    signals.after_task_publish.connect(
        _count_plain_publish, weak=False, dispatch_uid="proj.jobs.metrics.publish"
    )
    signals.task_prerun.connect(_run_starts, weak=False, dispatch_uid="proj.jobs.metrics.prerun")
    signals.task_postrun.connect(_run_ends, weak=False, dispatch_uid="proj.jobs.metrics.postrun")


def init_app(jobs: Jobs, flask_app: Flask) -> None:
    """Nothing: the web side is the ``/metrics`` blueprint (:mod:`proj.jobs.metrics_api`)."""


def enqueued(task_name: str, count: int = 1) -> None:
    """Count ``count`` new ledger jobs of ``task_name``, committed (the outbox
    calls this once the transaction that wrote their rows has committed)."""
    meters().enqueued.labels(task_name).inc(count)


def relayed(count: int) -> None:
    """Count ``count`` jobs the relay published."""
    if count:
        meters().relayed.inc(count)


def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: the message says when it was published."""
    if headers is not None:
        headers[PUBLISHED_HEADER] = time.time()


def _count_plain_publish(
    sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any
) -> None:
    """``after_task_publish``: a plain ``.delay()``'s first message is its
    enqueue (a ledger job's counts at commit; a retry is not an enqueue)."""
    headers = headers or {}
    if sender is None or headers.get(publisher.JOB_HEADER) or headers.get("retries"):
        return
    if not sender.startswith("celery.") and any(
        getattr(app, "finalized", False) and sender in app.tasks for app in list(_apps)
    ):
        meters().enqueued.labels(sender).inc()


@dataclass(frozen=True)
class _Run:
    started: float
    """``time.perf_counter()`` at the start."""
    waited: float | None
    """Seconds from when it could start to its start (None: unknown)."""


def _counts(task: Any) -> bool:
    """A run of one of this process's installations' tasks, in a worker."""
    return (
        task is not None
        and getattr(task.app, ATTRIBUTE, None) is not None
        and not task.request.is_eager
    )


def _run_starts(task: Any = None, **_: Any) -> None:
    if _counts(task):
        setattr(task.request, RUN_KEY, _Run(time.perf_counter(), _waited(task.request)))


def _waited(request: Any) -> float | None:
    published = request.get(PUBLISHED_HEADER)
    if not isinstance(published, int | float):
        return None
    could_start = float(published)
    if request.eta:
        with contextlib.suppress(TypeError, ValueError):  # one Celery could not read either
            could_start = max(could_start, parse_eta(request.eta).timestamp())
    return max(0.0, time.time() - could_start)


def _run_ends(task: Any = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    run: _Run | None = getattr(task.request, RUN_KEY, None) if task is not None else None
    if run is None:
        return
    outcome = _outcome(task, state, retval)
    if outcome is None:
        return
    found, name = meters(), task.name
    if outcome == RETRIED:
        found.retries.labels(name).inc()
    else:
        found.finished.labels(name, outcome).inc()
    found.run_duration.labels(name).observe(time.perf_counter() - run.started)
    if run.waited is not None:
        found.enqueue_to_start.labels(name).observe(run.waited)


def _outcome(task: Any, state: str | None, retval: Any) -> str | None:
    """What the run did to its job (None: nothing to count)."""
    if is_ledger_job(task.request) and claim_of(task) is None:
        return None  # skipped, or the claim itself failed: the job is not this run's
    if state == "SUCCESS":
        return SUCCEEDED
    if state == "FAILURE":
        return FAILED
    if state == "RETRY":
        return RETRIED
    if state == "REJECTED" and not getattr(retval, "requeue", False):
        return FAILED
    if state == "IGNORED" and isinstance(getattr(retval, "__cause__", None), JobCancelled):
        return CANCELLED
    return None
