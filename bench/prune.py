"""Measure what pruning a big ledger does to the enqueues meanwhile:
``python -m bench.prune`` (from the repository root), or ``--quick``.

For each way of pruning, on a new PostgreSQL database whose ledger holds
``--rows`` jobs that finished past the retention (each with its attempt):

- ``batched``: :meth:`proj.jobs.Jobs.prune` as the reference application's
  ``cleanup_expired`` calls it, in batches committed one by one;
- ``one transaction``: ``Jobs.prune(session)``, the whole of it in the
  session's one transaction.

A separate process enqueues all along, one ``apply_async_on_commit`` a
transaction as fast as it can (the fast path off: the broker is not
measured), timing each from its start to the end of its commit. Reported:
the enqueues' p50, p99 and longest before the prune and while it runs, and
the prune's time. Writes ``bench/results/prune-*.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy import text

import proj.jobs.migrations
from bench.many import postgres_version
from bench.run import ROOT, progress, proj_version, write_report
from proj.jobs import Jobs, JobsSettings, SqlAlchemyTask
from tests import stacks

TASK = "bench.prune.touch"
STALL_GOAL = 0.100
"""Seconds an enqueue may take while the prune runs."""
BEFORE = 3.0
"""Seconds the enqueues run alone before the prune starts."""
FILL = """
INSERT INTO jobs (id, name, args, kwargs, options, state, attempts, max_attempts,
                  created_at, available_at, published_at, started_at, finished_at, queue)
SELECT md5(i::text), 'bench.prune.touch', json_build_array(i), '{}', '{}',
       CASE WHEN i % 100 = 0 THEN 'failed' ELSE 'succeeded' END, 1, 1,
       now() - interval '60 days' + i * interval '1 millisecond', now() - interval '60 days',
       now() - interval '60 days', now() - interval '60 days',
       now() - interval '59 days' + i * interval '1 millisecond', 'celery'
FROM generate_series(1, :rows) AS i;
INSERT INTO job_attempts (job_id, attempt, outcome, started_at, finished_at)
SELECT md5(i::text), 1, 'succeeded', now() - interval '59 days', now() - interval '59 days'
FROM generate_series(1, :rows) AS i;
"""
WAYS = ("batched", "one transaction")


def make_task(database_url: str) -> SqlAlchemyTask:
    """The enqueued task, on an app of its own with proj's defaults but the
    fast path (a broker nobody reaches: nothing is published)."""
    celery_app = Celery("bench.prune", broker="memory://", set_as_current=False)
    settings = JobsSettings(database_url=database_url, outbox_fast_path=False)
    Jobs(celery_app, settings=settings)

    @celery_app.task(base=SqlAlchemyTask, name=TASK, shared=False)
    def touch(number: int) -> None:
        """Never run here."""

    task = celery_app.tasks[TASK]
    assert isinstance(task, SqlAlchemyTask)
    return task


def enqueue_until_stopped(database_url: str) -> None:
    """The enqueuing process, until SIGTERM: then it prints each enqueue's
    start (wall clock) and seconds."""
    task = make_task(database_url)
    jobs = Jobs.of(task.app)
    timings = []
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, frame: stopped.append(number))
    number = 0
    while not stopped:
        started, began = time.time(), time.perf_counter()
        with jobs.session_scope() as session:
            task.apply_async_on_commit((number,), session=session)
        timings.append((started, time.perf_counter() - began))
        number += 1
    jobs.dispose()
    print(json.dumps(timings))


def measure(rows: int, way: str, started: float) -> dict[str, float]:
    with stacks.postgres_database() as database_url:
        proj.jobs.migrations.upgrade(database_url)
        task = make_task(database_url)
        jobs = Jobs.of(task.app)
        with jobs.engine.begin() as connection:
            for statement in FILL.split(";")[:2]:
                connection.execute(text(statement), {"rows": rows})
        with jobs.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE jobs")
            connection.exec_driver_sql("VACUUM ANALYZE job_attempts")
        progress(started, f"{way}: {rows:,} finished jobs written")
        enqueuer = subprocess.Popen(
            [sys.executable, "-m", "bench.prune", "--enqueue", database_url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(BEFORE)  # the enqueues alone
        began = time.time()
        if way == "batched":
            deleted = jobs.prune()
        else:
            with jobs.session_scope() as session:
                deleted = jobs.prune(session)
        ended = time.time()
        enqueuer.terminate()
        out, _ = enqueuer.communicate(timeout=60)
        jobs.dispose()
    if deleted != rows:
        raise RuntimeError(f"{way}: pruned {deleted:,} of {rows:,} jobs")
    timings = [tuple(t) for t in json.loads(out)]
    alone = [s for at, s in timings if at + s < began]
    during = [s for at, s in timings if at + s >= began and at < ended]
    progress(started, f"{way}: pruned in {ended - began:.1f} s")
    return {
        "prune": ended - began,
        **{f"alone {k}": v for k, v in percentiles(alone).items()},
        **{f"during {k}": v for k, v in percentiles(during).items()},
        "enqueues during": len(during),
    }


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max": ordered[-1],
    }


def report(rows: int, found: dict[str, dict[str, float]], version: str, minutes: float) -> str:
    lines = [
        "| way | prune s | enqueues alone p50 / p99 / max ms "
        "| enqueues during the prune p50 / p99 / max ms | enqueues during | longest ≤ 100 ms |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for way, figures in found.items():
        alone = " / ".join(f"{figures[f'alone {k}'] * 1000:.1f}" for k in ("p50", "p99", "max"))
        during = " / ".join(f"{figures[f'during {k}'] * 1000:.1f}" for k in ("p50", "p99", "max"))
        met = "yes" if figures["during max"] <= STALL_GOAL else "**no**"
        lines.append(
            f"| {way} | {figures['prune']:.1f} | {alone} | {during} "
            f"| {figures['enqueues during']:,.0f} | {met} |"
        )
    return (
        f"# Pruning while enqueueing {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`python -m bench.prune --rows {rows}` at {version}; PostgreSQL {postgres_version()}, "
        f"{os.cpu_count()} cores.\n\n"
        f"Each way prunes a new ledger of {rows:,} jobs finished past the retention (each "
        "with one attempt) while another process enqueues one job a transaction as fast as "
        "it can (the fast path off); each enqueue is timed from its start to the end of its "
        "commit.\n\n" + "\n".join(lines) + f"\n\nThe run took {minutes:.1f} min.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    parser.add_argument("--enqueue", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.enqueue:
        enqueue_until_stopped(options.enqueue)
        return
    problem = stacks.missing_services("postgres")
    if problem:
        sys.exit(f"bench.prune needs PostgreSQL: {problem}")
    rows = 100_000 if options.quick else options.rows
    started, version = time.monotonic(), proj_version()
    found = {way: measure(rows, way, started) for way in WAYS}
    minutes = (time.monotonic() - started) / 60
    write_report("prune-", report(rows, found, version, minutes))


if __name__ == "__main__":
    main()
