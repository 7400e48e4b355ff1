"""A soak: ``python -m bench.soak [--minutes 30] [--share 0.6] [--stack pg-rabbit]``.

On a new stack, with proj's defaults, a ``proj-full`` worker (``celery
worker -P prefork -c 2``, beat beside it) first drains ``--drain-tasks``
enqueued jobs to measure its rate; then, on that same worker, jobs are
enqueued through ``apply_async_on_commit`` (``bench.enqueue``, one a
transaction, on a schedule) at ``--share`` of that rate for ``--minutes``.
Every minute the ledger's finished jobs are pruned (``Jobs.prune()`` with
``PROJ_RETENTION_DAYS=0``: a retention shorter than the soak, so the table's
size must stay bounded by it; where the server runs no autovacuum, the bench
vacuums ``jobs`` then in its place), and one line is written: the jobs that
started in that minute and their enqueue-to-start p50 and p99 (from the ledger's
``created_at`` and ``started_at``), the size of ``jobs`` with its indexes,
its live and dead tuples, the worker's resident memory (main process and
children) and the database's connections. Every job must run once.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, text

from bench import workload
from bench.run import connections, enqueue, prepared, wait_drained, write_report
from bench.workers import ROOT, worker, worker_rss_mb
from proj.celery import make_celery
from proj.config import load_settings
from proj.jobs import Jobs
from tests import stacks

STARTED = text(
    "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM jobs "
    "WHERE started_at >= :since AND started_at < :until AND name = 'bench.touch'"
)
TABLE = text(
    "SELECT pg_total_relation_size('jobs'), n_live_tup, n_dead_tup "
    "FROM pg_stat_user_tables WHERE relname = 'jobs'"
)
WINDOW = 5
"""Minutes at the start and at the end whose latencies are compared."""


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def sample(engine: Engine, since: datetime, until: datetime) -> tuple[list[float], tuple[int, ...]]:
    """The enqueue-to-start latencies (ms) of the jobs started from ``since``
    to ``until``, and the size, live and dead tuples of ``jobs``."""
    with engine.connect() as connection:
        found = [float(v) for v in connection.scalars(STARTED, {"since": since, "until": until})]
        size = tuple(int(v or 0) for v in connection.execute(TABLE).one())
    return found, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--share", type=float, default=0.6)
    parser.add_argument("--drain-tasks", type=int, default=4000)
    parser.add_argument("--stack", default="pg-rabbit")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as name, stacks.stack(options.stack, Path(name)) as made:
        folder = Path(name)
        settings, env, engine = prepared(made)
        with engine.connect() as connection:
            autovacuum = connection.exec_driver_sql("SHOW autovacuum").scalar() == "on"
        pruner = Jobs.of(make_celery(load_settings({**made, "PROJ_RETENTION_DAYS": "0"})))
        enqueue("proj-full", options.drain_tasks, env)
        with worker("proj-full", env, folder) as pid, ExitStack() as running:
            wait_drained(engine, options.drain_tasks)
            drain = options.drain_tasks / workload.drain_seconds(engine)
            pruner.prune()
            rate = drain * options.share
            total = int(rate * options.minutes * 60)
            print(f"drain {drain:.0f} jobs/s; enqueueing {total:,} at {rate:.0f}/s", flush=True)
            command = ["bench.enqueue", "proj-full", str(total), str(1 / rate)]
            sender = running.enter_context(
                subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=ROOT)
            )
            running.callback(sender.terminate)  # on any error; it has ended otherwise
            rows, minutes = [], []
            began = datetime.now(UTC)
            for minute in range(1, options.minutes + 1):
                time.sleep(max(0.0, began.timestamp() + 60 * minute - time.time()))
                since, until = began + timedelta(minutes=minute - 1), datetime.now(UTC)
                latencies, (size, live, dead) = sample(engine, since, until)
                pruned = pruner.prune()
                if not autovacuum:
                    with engine.connect() as connection:
                        connection.execution_options(isolation_level="AUTOCOMMIT")
                        connection.exec_driver_sql("VACUUM jobs")
                minutes.append(latencies)
                rows.append(
                    f"| {minute} | {len(latencies):,} | {percentile(latencies, 0.5):.1f} | "
                    f"{percentile(latencies, 0.99):.1f} | {size / 2**20:.1f} | {live:,} | "
                    f"{dead:,} | {pruned:,} | {worker_rss_mb(pid):.0f} | {connections(engine)} |"
                )
                print(rows[-1], flush=True)
            sender.wait()
            wait_drained(engine, options.drain_tasks + total)
            counted = sum(workload.touches(engine).values())
        first = [v for found in minutes[:WINDOW] for v in found]
        last = [v for found in minutes[-WINDOW:] for v in found]
        p99_first, p99_last = percentile(first, 0.99), percentile(last, 0.99)
        engine.dispose()
        pruner.dispose()
    header = (
        "| minute | jobs started | p50 ms | p99 ms | jobs MiB | live | dead | pruned "
        "| worker MiB | connections |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    write_report(
        "soak-",
        f"# Soak {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`python -m bench.soak --minutes {options.minutes} --share {options.share} "
        f"--drain-tasks {options.drain_tasks} --stack {options.stack}` on "
        f"{settings.database_url.split('://')[0]}, `celery worker -P prefork -c 2`.\n\n"
        f"Drain measured first: {drain:.0f} jobs/s; then {total:,} jobs at {rate:.0f}/s "
        f"({options.share:.0%}), one a transaction; autovacuum "
        f"{'on' if autovacuum else 'off on this server, so `VACUUM jobs` after each prune'}"
        "; every job ran once: "
        f"{counted == options.drain_tasks + total} ({counted:,} runs).\n\n"
        f"{header}\n" + "\n".join(rows) + "\n\n"
        f"Enqueue-to-start p99, first {WINDOW} minutes: {p99_first:.1f} ms; last {WINDOW}: "
        f"{p99_last:.1f} ms ({p99_last / p99_first:.2f}×).\n",
    )


if __name__ == "__main__":
    main()
