"""Enqueue the workload's tasks the way each variant's users would, and print
the rate, the database work per enqueue and whether Celery stores the
task's results, as JSON:
``python -m bench.enqueue VARIANT COUNT [INTERVAL [PER_TRANSACTION]]``.

``proj-full`` (and its observed variants) enqueues in a session's transaction
(``apply_async_on_commit`` with the session given; ``delay_on_commit`` finds a
web request's the same way), one task a transaction unless
``PER_TRANSACTION`` says more; ``baseline``, ``proj`` and ``proj-results``
call ``delay()``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.backends.base import DisabledBackend

from bench import stats
from bench.workload import USERS


def task_of(variant: str) -> Task[Any, Any]:
    """The task ``variant`` enqueues."""
    if variant == "baseline":
        from bench.baseline import touch as plain

        return plain
    import proj.celery  # noqa: F401  (proj's app becomes the default)
    from bench.proj_touch import touch, touch_stored

    return touch_stored if variant == "proj-results" else touch


def results_stored(variant: str, task: Task[Any, Any]) -> bool:
    """Whether the worker will store the task's results in Celery's result
    backend: never for a job enqueued through the ledger (its row holds the
    job's state and result), else as the task and the app's backend say."""
    if variant.startswith("proj-full"):
        return False
    return not task.ignore_result and not isinstance(task.backend, DisabledBackend)


def enqueuer(variant: str) -> Callable[[list[int]], object]:
    """Enqueues a task for each user id given (in one transaction, for proj-full)."""
    task = task_of(variant)
    if not variant.startswith("proj-full"):
        return lambda user_ids: [task.delay(u, time.time()) for u in user_ids]
    from bench.proj_touch import touch
    from proj.db import session_scope

    def on_commit(user_ids: list[int]) -> None:
        with session_scope() as session:  # as a web request's session would be
            for user_id in user_ids:
                touch.apply_async_on_commit((user_id, time.time()), session=session)

    return on_commit


def main() -> None:
    variant, count = sys.argv[1], int(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    per_transaction = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    send = enqueuer(variant)
    send([0])  # connect first; there is no user 0
    if variant.startswith("proj-full"):
        # Its publishing thread connects too (to the broker and the
        # database) before the first timed enqueue.
        from proj.jobs import Jobs

        Jobs.of(task_of(variant).app).flush()
    stats.count_database_work()
    stats.counts.clear()
    started = time.perf_counter()
    for first in range(0, count, per_transaction):
        send([n % USERS + 1 for n in range(first, min(first + per_transaction, count))])
        if interval:  # on a schedule: the next send is due ``interval`` after the last was
            due = started + (first // per_transaction + 1) * interval
            time.sleep(max(0.0, due - time.perf_counter()))
    seconds = time.perf_counter() - started
    stored = results_stored(variant, task_of(variant))
    print(json.dumps({"count": count, "seconds": seconds, "results": stored, **stats.counts}))


if __name__ == "__main__":
    main()
