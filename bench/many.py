"""Measure how fast ``enqueue_many`` writes a batch of jobs: ``python -m bench.many``
(from the repository root), or ``python -m bench.many --quick`` for a shorter run.

On a new PostgreSQL database, each variant writes the same batch (10,000
jobs of one task, two small arguments each) and is timed from the calls to
the end of its commit:

- ``enqueue_many``: ``task.enqueue_many(calls, session=session)`` in a
  session on the worker engine, then its commit (its after-commit hook
  included);
- ``plain INSERT``: the same rows (an id, the arguments, the options and
  times ``enqueue_many`` writes) in one hand-written ``INSERT ... VALUES``
  that psycopg2's ``execute_values`` builds, on a raw connection of the same
  engine, then committed: no argument checks, no SQLAlchemy, no outbox;
- ``apply_async_on_commit loop``: one ``apply_async_on_commit`` a job in one
  transaction, what ``enqueue_many`` replaces.

Publishing is left out (the fast path off, as ``enqueue_many``'s commit
publishes nothing in any case). The variants take turns, round by round,
the first of a round rotating, after a round not timed that warms the
connections and SQLAlchemy's statement cache; every run starts from an
empty jobs table. Reported per variant: the median of the rounds, jobs a
second, the ratio to plain INSERT, and the SQL statements SQLAlchemy sent.
Writes a Markdown report to ``bench/results/many-*.md``: about 2 minutes on
2 cores, under 1 with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg2.extras
from celery import Celery
from sqlalchemy import Engine, event, text

import proj.jobs.migrations
from bench.run import progress, proj_version, write_report
from proj.jobs import Jobs, JobsSettings, SqlAlchemyTask
from tests import stacks

MANY, PLAIN, LOOP = "enqueue_many", "plain INSERT", "apply_async_on_commit loop"
VARIANTS = (MANY, PLAIN, LOOP)
TASK = "bench.many.touch"
GOAL = 1.0
QUICK_NOTE = (
    " A quick run's three rounds check that the run works; its figures are not for quoting."
)
"""Seconds: 10,000 jobs enqueue in well under this."""
FULL = {"jobs": 10_000, "rounds": 9}
QUICK = {"jobs": 10_000, "rounds": 3}
PLAIN_INSERT = (
    "INSERT INTO jobs (id, args, name, kwargs, options, context, state, attempts, max_attempts,"
    " available_at, created_at) VALUES %s"
)

Calls = list[tuple[Any, ...]]


def make_task(database_url: str) -> SqlAlchemyTask:
    """The batch's task, on an app of its own with proj's defaults but the fast
    path (and a broker nobody reaches: nothing is published)."""
    celery_app = Celery("bench.many", broker="memory://", set_as_current=False)
    Jobs(celery_app, settings=JobsSettings(database_url=database_url, outbox_fast_path=False))

    @celery_app.task(base=SqlAlchemyTask, name=TASK, shared=False)
    def touch(user_id: int, enqueued_at: float) -> None:
        """Never run here."""

    task = celery_app.tasks[TASK]
    assert isinstance(task, SqlAlchemyTask)
    return task


def enqueue_many(task: SqlAlchemyTask, calls: Calls) -> None:
    with Jobs.of(task.app).session_scope() as session:
        task.enqueue_many(calls, session=session)


def plain_insert(task: SqlAlchemyTask, calls: Calls) -> None:
    """The rows ``enqueue_many`` writes for ``calls``, in one ``INSERT ... VALUES``."""
    now = datetime.now(UTC)
    same = (TASK, "{}", "{}", "{}", "queued", 0, Jobs.of(task.app).settings.max_attempts, now, now)
    rows = [(str(uuid.uuid4()), json.dumps(args), *same) for args in calls]
    connection = Jobs.of(task.app).engine.raw_connection()
    try:
        cursor: Any = connection.cursor()
        psycopg2.extras.execute_values(cursor, PLAIN_INSERT, rows, page_size=len(rows))
        connection.commit()
    finally:
        connection.close()


def loop(task: SqlAlchemyTask, calls: Calls) -> None:
    with Jobs.of(task.app).session_scope() as session:
        for args in calls:
            task.apply_async_on_commit(args, session=session)


WRITERS: dict[str, Callable[[SqlAlchemyTask, Calls], None]] = {
    MANY: enqueue_many,
    PLAIN: plain_insert,
    LOOP: loop,
}


class Run:
    """What a run found: each variant's seconds, round by round, and the SQL
    statements SQLAlchemy sent for its batch."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        self.statements: dict[str, int] = {PLAIN: 1}  # execute_values' one page
        self.sent = 0

    def count(self, *_: Any) -> None:
        self.sent += 1


def empty(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE jobs"))


def timed(run: Run, task: SqlAlchemyTask, variant: str, calls: Calls) -> float:
    """Seconds ``variant`` takes to write ``calls``, from an empty jobs table."""
    engine = Jobs.of(task.app).engine
    empty(engine)
    run.sent = 0
    started = time.perf_counter()
    WRITERS[variant](task, calls)
    seconds = time.perf_counter() - started
    if variant != PLAIN:
        run.statements[variant] = run.sent
    with engine.connect() as connection:
        written = connection.scalar(text("SELECT count(*) FROM jobs"))
    if written != len(calls):
        raise RuntimeError(f"{variant} wrote {written} rows of {len(calls)}")
    return seconds


def measure(options: argparse.Namespace, started: float) -> Run:
    """Every variant's rounds on a new PostgreSQL database, taking turns."""
    run = Run()
    with stacks.postgres_database() as database_url:
        proj.jobs.migrations.upgrade(database_url)
        task = make_task(database_url)
        engine = Jobs.of(task.app).engine
        event.listen(engine, "before_cursor_execute", run.count)
        calls: Calls = [(n % 1000 + 1, time.time()) for n in range(options.jobs)]
        for variant in VARIANTS:
            timed(run, task, variant, calls)  # warming up, not kept
        for number in range(options.rounds):
            turn = VARIANTS[number % len(VARIANTS) :] + VARIANTS[: number % len(VARIANTS)]
            for variant in turn:
                run.seconds[variant].append(timed(run, task, variant, calls))
            progress(started, f"round {number + 1} of {options.rounds} done")
        empty(engine)
        Jobs.of(task.app).dispose()
    return run


def table(run: Run, jobs: int) -> str:
    plain = statistics.median(run.seconds[PLAIN])
    lines = [
        "| Variant | Time to commit p50 (min–max) | Jobs/s p50 | × plain INSERT | SQL statements |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, seconds in run.seconds.items():
        p50 = statistics.median(seconds)
        spread = f"{min(seconds) * 1000:,.0f}–{max(seconds) * 1000:,.0f}"
        lines.append(
            f"| {variant} | {p50 * 1000:,.0f} ms ({spread}) | {jobs / p50:,.0f} "
            f"| {plain / p50:.2f} | {run.statements[variant]:,} |"
        )
    return "\n".join(lines)


def postgres_version() -> str:
    host, port, user = stacks.POSTGRES
    connection = psycopg2.connect(host=host, port=port, user=user, dbname="postgres")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            found = cursor.fetchone()
            return str(found[0]) if found else "unknown"
    finally:
        connection.close()


def report(
    options: argparse.Namespace, run: Run, minutes: float, version: str, load: tuple[float, ...]
) -> str:
    command = (
        f"python -m bench.many{' --quick' if options.quick else ''} "
        f"--jobs {options.jobs} --rounds {options.rounds}"
    )
    many = statistics.median(run.seconds[MANY])
    goal = "yes" if many < GOAL else "**no**"
    return (
        f"# enqueue_many {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`{command}` at {version}; PostgreSQL {postgres_version()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end.\n\n"
        f"Each variant writes the same {options.jobs:,} jobs in one transaction, timed "
        "from the calls to the end of the commit, from an empty jobs table. "
        "`plain INSERT` is one hand-written `INSERT ... VALUES` of the same rows "
        "(psycopg2's `execute_values`) on a raw connection of the same engine. The "
        f"variants take turns, round by round ({options.rounds} rounds, after one "
        "not kept); *SQL statements* are those SQLAlchemy sent for one batch. "
        f"{options.jobs:,} jobs through `enqueue_many` in under {GOAL:g} s: {goal}."
        f"{QUICK_NOTE if options.quick else ''}\n\n"
        f"{table(run, options.jobs)}\n\n"
        f"The run took {minutes:.1f} min.\n"
    )


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK['rounds']} rounds instead of {FULL['rounds']}"
    )
    parser.add_argument("--jobs", type=int, help=f"jobs a batch ({FULL['jobs']:,})")
    parser.add_argument("--rounds", type=int, help=f"rounds timed ({FULL['rounds']})")
    options = parser.parse_args()
    for name, value in (QUICK if options.quick else FULL).items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    return options


def main() -> None:
    options = parse_options()
    problem = stacks.missing_services("postgres")
    if problem:
        sys.exit(f"bench.many needs PostgreSQL: {problem}")
    started, load = time.monotonic(), os.getloadavg()
    version = proj_version()
    run = measure(options, started)
    minutes = (time.monotonic() - started) / 60
    write_report("many-", report(options, run, minutes, version, load))


if __name__ == "__main__":
    main()
