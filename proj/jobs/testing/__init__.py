"""proj.jobs's testing kit, for your tests as for proj's own.

- the in-memory mode (no broker): :func:`in_memory`, :func:`assert_enqueued`,
  :func:`refute_enqueued`, :func:`enqueued_jobs`, :func:`run_enqueued`;
- real workers: :func:`worker` (in-process), :func:`wait_for`,
  :func:`wait_for_state`, :func:`job`, :func:`failed_job`, :func:`checked_out`;
- fault injection (:mod:`proj.jobs.testing.faults`): a TCP proxy that cuts or
  blackholes connections, private Redis and PostgreSQL servers to restart;
- a pytest plugin (:mod:`proj.jobs.testing.plugin`) with an ``enqueued`` fixture.
"""

from __future__ import annotations

from proj.jobs.testing.memory import (
    EnqueuedJob,
    InMemoryQueue,
    assert_enqueued,
    enqueued_jobs,
    in_memory,
    refute_enqueued,
    run_enqueued,
)
from proj.jobs.testing.workers import (
    checked_out,
    failed_job,
    failed_jobs,
    job,
    wait_for,
    wait_for_state,
    worker,
)

__all__ = [
    "EnqueuedJob",
    "InMemoryQueue",
    "assert_enqueued",
    "checked_out",
    "enqueued_jobs",
    "failed_job",
    "failed_jobs",
    "in_memory",
    "job",
    "refute_enqueued",
    "run_enqueued",
    "wait_for",
    "wait_for_state",
    "worker",
]
