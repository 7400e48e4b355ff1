"""Run the benchmark: ``python -m bench.run`` (from the repository root), or
``python -m bench.run --quick`` for a smaller one.

Every variant runs on its library's defaults as installed, draining the
workload (:mod:`bench.workload`) with a ``celery worker -P prefork -c 2``
subprocess (:mod:`bench.workers`):

- ``baseline``: plain Celery with Celery's own defaults (no result backend),
  the classic session recipe, ``delay()``;
- ``proj``: the same task on ``SqlAlchemyTask`` with proj's ``celeryconfig``
  as it is (whatever it says about results and confirms), ``delay()``;
- ``proj-results``: ``proj`` with ``ignore_result=False``, a user who opts
  in to Celery's stored results (not in a ``--quick`` run unless ``--results``);
- ``proj-full``: ``delay_on_commit`` through the ledger (claims, late acks,
  relay in the worker, beat running the reconciler). On SQLite this is the
  embedded setup, and the only variant.

The variants take turns, on each stack (PostgreSQL + RabbitMQ, PostgreSQL +
Redis, embedded SQLite): round 1 of each, then round 2 of each, and so on, so
the shared machine's drift falls on all of them alike. A round enqueues into
an idle queue, then starts a worker and times it draining the queue, so
neither rate caps the other. The worker of a variant's last round then takes
the latency pass (tasks 20 ms apart) and is looked at resting.

Beside them, in the same run, the limits (:mod:`bench.limits`): ``pgbench``
running the task's transaction with 2 clients, raw kombu publishing (without
confirms, and on RabbitMQ with confirms awaited together) and consuming with
no database, and the relay's publish rate with the fast path off. While each
drain runs, the CPU time of the worker's processes, PostgreSQL's and the
broker's is counted per task. On one stack the proj-full worker's memory is
measured after 1,000 tasks and after ``--rss-tasks``. Figures are ratios
against those measured in the same run; every round also checks that each
user's counter equals the tasks sent to it (and a stopped worker leaves no
connection open), and the report says which check failed. Writes a Markdown
report, with the run's wall time, to ``bench/results/``: about 10 minutes
on 2 cores, about 2 with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from bench import limits, stats, workload
from bench.figures import Figures, Limits, limits_table, problems, table
from bench.workers import (
    OBSERVED,
    ROOT,
    cpu_seconds,
    variant_env,
    worker,
    worker_rss_mb,
)
from proj.config import Settings, load_settings
from proj.migrations import upgrade
from tests import stacks

LATENCY_TASKS = 200
RSS_WARMUP = 1000
RSS_BATCH = 50
FULL = {
    "tasks": 3000,
    "runs": 3,
    "relay_jobs": 5000,
    "raw_messages": 10_000,
    "rss_tasks": 50_000,
    "stacks": ",".join(stacks.STACKS),
    "pgbench_seconds": 10,
    "results": True,
}
"""What a run measures, unless told otherwise."""
QUICK = {
    "tasks": 1000,
    "runs": 1,
    "relay_jobs": 1000,
    "raw_messages": 10_000,
    "rss_tasks": 0,
    "stacks": "pg-rabbit,pg-redis",
    "pgbench_seconds": 5,
    "results": False,
}
"""What a ``--quick`` run measures, unless told otherwise: the table's
figures on both brokers, but memory and ``proj-results``, in one round."""
QUICK_NOTE = " A quick run's one round checks that the run works; its figures are not for quoting."


def enqueue(
    variant: str,
    count: int,
    env: dict[str, str],
    interval: float = 0.0,
    per_transaction: int = 1,
) -> dict[str, Any]:
    """Run :mod:`bench.enqueue` for ``variant``; its report."""
    command = ["bench.enqueue", variant, str(count), str(interval), str(per_transaction)]
    done = subprocess.run(
        [sys.executable, "-m", *command],
        env=variant_env(variant, env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def wait_drained(engine: Engine, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while sum(workload.touches(engine).values()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(workload.touches(engine).values())} of {count} ran")
        time.sleep(0.2)


def expected(count: int) -> dict[int, int]:
    base, extra = divmod(count, workload.USERS)
    return {u: base + (1 if u <= extra else 0) for u in range(1, workload.USERS + 1)}


def check_counters(figures: Figures, engine: Engine, tasks: int, when: str) -> None:
    """Each user's counter must equal the tasks sent to it: none lost, none run twice."""
    found, wanted = workload.touches(engine), expected(tasks)
    if found != wanted:
        off = sum(1 for user, count in wanted.items() if found.get(user) != count)
        figures.problems.append(
            f"{when}: {sum(found.values())} runs of {tasks} tasks, {off} users' counters off"
        )


def connections(engine: Engine) -> int | None:
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        )


def connections_closing(engine: Engine, within: float = 10.0) -> int:
    """The connections still open once they are all closed, or ``within``
    seconds have passed (a stopped worker's server processes take a moment
    to go, longer on a busy machine)."""
    deadline = time.monotonic() + within
    while (left := connections(engine) or 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def drain_round(
    figures: Figures, env: dict[str, str], engine: Engine, tasks: int, folder: Path, last: bool
) -> None:
    """One round of ``figures.variant``: enqueue ``tasks`` into an idle queue,
    then start a worker and time it draining them. In the ``last`` round the
    same worker then takes the latency pass, and once it has stopped the
    database must hold none of its connections."""
    variant = figures.variant
    workload.clear(engine)
    report = enqueue(variant, tasks, env)
    figures.enqueue_rates.append(report["count"] / report["seconds"])
    figures.enqueue_statements.append(report.get("statements", 0) / tasks)
    figures.results_stored = bool(report["results"])
    with worker(variant, env, folder) as pid:
        before, ran = cpu_seconds(pid), sum(workload.touches(engine).values())
        wait_drained(engine, tasks)
        # Counted from the moment the worker was ready: the tasks it ran after.
        for part, seconds in cpu_seconds(pid).items():
            if ran == tasks or (figures.stack == "sqlite" and part != "worker"):
                continue  # on SQLite the worker holds the database and the broker
            per_task = 1000 * (seconds - before[part]) / (tasks - ran)
            figures.cpu_ms.setdefault(part, []).append(per_task)
        figures.drain_rates.append(tasks / workload.drain_seconds(engine))
        check_counters(figures, engine, tasks, f"round {len(figures.drain_rates)}")
        if last:
            latency_pass(figures, env, engine)
    if last and engine.dialect.name == "postgresql":
        left = connections_closing(engine)
        if left:
            figures.problems.append(f"{left} connections still open 10 s after its worker stopped")


def latency_pass(figures: Figures, env: dict[str, str], engine: Engine) -> None:
    """Enqueue to start, with a worker already running and idle: tasks sent
    20 ms apart; then the connections the resting worker holds."""
    workload.clear(engine)
    enqueue(figures.variant, LATENCY_TASKS, env, interval=0.02)
    wait_drained(engine, LATENCY_TASKS)
    latencies = workload.latencies(engine)
    figures.latency_p50 = statistics.median(latencies)
    figures.latency_p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    check_counters(figures, engine, LATENCY_TASKS, "latency pass")
    time.sleep(2)
    figures.connections_at_rest = connections(engine)


def count_statements(figures: Figures, stats_dir: Path, ran: int) -> None:
    """The worker-side database work per task, from what its processes wrote
    as they stopped (``ran`` tasks in all)."""
    done = stats.collected(stats_dir)
    figures.statements = done["statements"] / ran
    figures.round_trips = done["round_trips"] / ran


def rss_growth(
    env: dict[str, str], engine: Engine, tasks: int, folder: Path
) -> tuple[float, float]:
    """The proj-full worker's memory after 1,000 tasks and after ``tasks``."""
    workload.clear(engine)
    with worker("proj-full", env, folder) as pid:
        enqueue("proj-full", RSS_WARMUP, env)
        wait_drained(engine, RSS_WARMUP)
        warm = worker_rss_mb(pid)
        # Many jobs a transaction: only the worker's memory is measured here.
        enqueue("proj-full", tasks - RSS_WARMUP, env, per_transaction=RSS_BATCH)
        wait_drained(engine, tasks, timeout=1800)
        return warm, worker_rss_mb(pid)


def variants_of(stack: str, options: argparse.Namespace) -> list[str]:
    if stack == "sqlite":
        return ["proj-full"]
    return [
        "baseline",
        "proj",
        *(["proj-results"] if options.results else []),
        "proj-full",
        *(OBSERVED if options.observed else []),
    ]


def prepared(made: dict[str, str]) -> tuple[Settings, dict[str, str], Engine]:
    """A new stack's (``made``) settings, the environment every process of a
    round runs with, and an engine on its database, migrated and holding the
    workload's users."""
    settings = load_settings(made)
    env = {
        **os.environ,
        **made,
        "PYTHONPATH": str(ROOT),
        # Resolved to the driver proj ships, as every process must read
        # them (the baseline's Celery reads CELERY_RESULT_BACKEND itself).
        "DATABASE_URL": settings.database_url,
        "CELERY_RESULT_BACKEND": settings.result_backend,
        "PROJ_RECONCILE_INTERVAL": "5",
    }
    upgrade(settings.database_url)
    engine = create_engine(settings.database_url)
    workload.reset(engine)
    return settings, env, engine


def run_stack(
    stack: str, options: argparse.Namespace, started: float
) -> tuple[list[Figures], Limits]:
    """Every variant's rounds on a new ``stack``, taking turns, then its limits."""
    with tempfile.TemporaryDirectory() as name, stacks.stack(stack, Path(name)) as made:
        folder = Path(name)
        settings, env, engine = prepared(made)
        figures = {v: Figures(stack, v) for v in variants_of(stack, options)}
        counted = {v: {**env, "BENCH_STATS_DIR": str(folder / f"stats-{v}")} for v in figures}
        for counting in counted.values():
            Path(counting["BENCH_STATS_DIR"]).mkdir()
        for number in range(1, options.runs + 1):
            for variant, found in figures.items():
                last = number == options.runs
                known = len(found.problems)
                drain_round(found, counted[variant], engine, options.tasks, folder, last)
                rate = f"{found.drain_rates[-1]:.0f} tasks/s"
                progress(started, f"{stack} {variant} round {number}: {rate}")
                for problem in found.problems[known:]:
                    progress(started, f"{stack} {variant} check failed: {problem}")
        for variant, found in figures.items():
            ran = options.runs * options.tasks + LATENCY_TASKS
            count_statements(found, Path(counted[variant]["BENCH_STATS_DIR"]), ran)
        if options.rss_tasks and stack == options.rss_stack and "proj-full" in figures:
            full = figures["proj-full"]
            full.rss_mb = rss_growth(env, engine, options.rss_tasks, folder)
            check_counters(full, engine, options.rss_tasks, "memory run")
            warm, after = full.rss_mb
            progress(started, f"{stack} proj-full MiB: {warm:.0f} → {after:.0f}")
        tps = None
        if engine.dialect.name == "postgresql":
            tps = limits.pgbench_tps(settings.database_url, folder, options.pgbench_seconds)
        relay = limits.relay_rate(env, options.relay_jobs)
        broker = None
        if stack != "sqlite":
            broker_url = settings.celery_connection()["broker_url"]
            broker = limits.raw_broker(broker_url, options.raw_messages)
        engine.dispose()
        progress(started, f"{stack} limits measured")
        return list(figures.values()), Limits(stack, relay, tps, broker)


def progress(started: float, what: str) -> None:
    print(f"[{(time.monotonic() - started) / 60:4.1f} min] {what}", file=sys.stderr)


def proj_version() -> str:
    """The commit measured, ``-dirty`` if the working tree differs from it."""
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def report(
    options: argparse.Namespace,
    results: list[Figures],
    found: list[Limits],
    minutes: float,
    version: str,
) -> str:
    command = (
        f"python -m bench.run{' --quick' if options.quick else ''} --tasks {options.tasks} "
        f"--runs {options.runs} --relay-jobs {options.relay_jobs} "
        f"--raw-messages {options.raw_messages} "
        f"--rss-tasks {options.rss_tasks} --stacks {options.stacks}"
        f"{' --results' if options.results else ' --no-results'}"
        f"{' --observed' if options.observed else ''}"
    )
    pgbench = {f.stack: f.pgbench for f in found if f.pgbench is not None}
    memory = (
        f" RSS is the proj-full worker's on {options.rss_stack} (main process and children) "
        f"after 1,000 tasks and after {options.rss_tasks:,}."
        if options.rss_tasks
        else ""
    )
    failed = problems(results)
    if failed:
        failed = f"Checks that failed:\n\n{failed}\n"
    return (
        f"# Benchmark {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`{command}` at {version}; worker `celery worker -P prefork -c 2`, "
        f"{os.cpu_count()} cores.\n\n"
        "Every variant runs on its library's defaults as installed: `baseline` on "
        "Celery's own (no result backend), the proj variants on `SqlAlchemyTask` with "
        "proj's `celeryconfig` as it is (*Celery results stored* says what that "
        "stores; `proj-results` opts in with `ignore_result=False`).\n\n"
        f"The variants take turns, round by round ({options.runs} round"
        f"{'s' if options.runs > 1 else ''}); a round enqueues "
        "into an idle queue, then a new worker drains it. Drain is the median of the "
        "rounds, first start to last commit; latency is enqueue to start, "
        f"{LATENCY_TASKS} tasks 20 ms apart, on the worker of a variant's last round after "
        f"its drain.{memory}{QUICK_NOTE if options.quick else ''}\n\n"
        f"{table(results, pgbench)}\n\n{failed}"
        f"The relay publishes {options.relay_jobs:,} jobs; raw kombu, "
        f"{options.raw_messages:,} messages.\n\n"
        f"{limits_table(found)}\n\n"
        f"The run took {minutes:.1f} min.\n"
    )


def write_report(prefix: str, text: str) -> None:
    """Keep a run's report in ``bench/results/`` (named ``prefix`` and the
    time), and print it."""
    out = ROOT / "bench" / "results" / f"{prefix}{datetime.now(UTC):%Y%m%d-%H%M}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes (a few minutes): "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--tasks", type=int, help=f"tasks a round (default {FULL['tasks']})")
    parser.add_argument("--runs", type=int, help=f"rounds (default {FULL['runs']})")
    parser.add_argument("--relay-jobs", type=int, help=f"default {FULL['relay_jobs']}")
    parser.add_argument("--raw-messages", type=int, help=f"default {FULL['raw_messages']}")
    parser.add_argument("--rss-tasks", type=int, help=f"0 to skip (default {FULL['rss_tasks']:,})")
    parser.add_argument("--rss-stack", default="pg-rabbit", help="where memory is measured")
    parser.add_argument("--stacks", help=f"default {FULL['stacks']}")
    parser.add_argument("--pgbench-seconds", type=int, help=f"default {FULL['pgbench_seconds']}")
    parser.add_argument(
        "--results",
        action=argparse.BooleanOptionalAction,
        help="proj-results too: the proj task with ignore_result=False (default: not if --quick)",
    )
    parser.add_argument(
        "--observed",
        action="store_true",
        help="also proj-full at INFO with JSON logs and traces on, and with them off",
    )
    options = parser.parse_args()
    for name, value in (QUICK if options.quick else FULL).items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    return options


def main() -> None:
    options = parse_options()
    started = time.monotonic()
    version = proj_version()
    results: list[Figures] = []
    found: list[Limits] = []
    for stack in options.stacks.split(","):
        problem = stacks.missing_services(stack)
        if problem:
            print(f"skipping {stack}: {problem}", file=sys.stderr)
            continue
        figures, stack_limits = run_stack(stack, options, started)
        results += figures
        found.append(stack_limits)
    minutes = (time.monotonic() - started) / 60
    write_report("", report(options, results, found, minutes, version))


if __name__ == "__main__":
    main()
