"""Measure what ``delay_on_commit`` adds to the request that enqueues:
``python -m bench.request`` (from the repository root), or ``--quick``.

On a new PostgreSQL database and a broker of its own (RabbitMQ, then Redis),
with proj's defaults (the fast path on), each variant makes the same number
of transactions, one at a time, each timed from its start to the end of its
commit (the after-commit hook included):

- ``request``: a session's transaction that inserts one row of the
  application's own (an order);
- ``request + job``: the same, plus ``apply_async_on_commit`` of one job;
- ``job``: a transaction with only ``apply_async_on_commit`` of one job;
- ``job, fast path off``: the same with ``PROJ_OUTBOX_FAST_PATH`` off, so
  nothing is published in the process (the relay would publish the rows):
  what the publishing thread's work costs the request, on a machine whose
  cores the thread shares;
- ``plain INSERT``: ``BEGIN; INSERT; COMMIT`` of the same job row, hand
  written, on a raw psycopg2 connection of the same engine.

The publish and the published mark happen on the process's publishing
thread (:mod:`proj.jobs.sender`), which runs meanwhile; after each round the
run waits for it and checks that every job of the round is marked published
and that the broker holds exactly their messages (then purges them). The
variants take turns, round by round, the first of a round rotating, after a
round not kept. Reported per broker and variant: the median of the rounds'
p50 and p99 transaction times, and transactions a second. Writes a Markdown
report to ``bench/results/request-*.md``: about 3 minutes on 2 cores.
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
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select

import proj.jobs.migrations
from bench.many import postgres_version
from bench.run import progress, proj_version, write_report
from proj.jobs import Job, Jobs, JobsSettings, SqlAlchemyTask
from tests import stacks

REQUEST, WITH_JOB, JOB, PLAIN = "request", "request + job", "job", "plain INSERT"
UNPUBLISHED = "job, fast path off"
VARIANTS = (REQUEST, WITH_JOB, JOB, UNPUBLISHED, PLAIN)
PUBLISHED = (WITH_JOB, JOB)
"""The variants whose jobs the publishing thread publishes."""
TASK = "bench.request.touch"
ADDED_GOAL = 0.5
"""Milliseconds one job may add to a request's p50."""
RATE_GOAL = 0.6
"""``job`` transactions a second, as a share of ``plain INSERT``'s."""
FULL = {"transactions": 2000, "rounds": 5}
QUICK = {"transactions": 500, "rounds": 2}
QUICK_NOTE = " A quick run checks that the run works; its figures are not for quoting."
PLAIN_INSERT = (
    "INSERT INTO jobs (id, name, args, kwargs, options, context, state, attempts,"
    " max_attempts, available_at, created_at, queue, priority)"
    " VALUES (%s, %s, %s, '{}', '{}', '{}', 'queued', 0, %s, %s, %s, 'celery', 0)"
)
ORDERS = Table(
    "bench_orders",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("note", String(40), nullable=False),
)

Variant = Callable[[SqlAlchemyTask, int], None]


def make_task(database_url: str, broker_url: str) -> SqlAlchemyTask:
    """The enqueued task, on an app of its own with proj's defaults."""
    celery_app = Celery("bench.request", broker=broker_url, set_as_current=False)
    Jobs(celery_app, settings=JobsSettings(database_url=database_url))

    @celery_app.task(base=SqlAlchemyTask, name=TASK, shared=False)
    def touch(order: int) -> None:
        """Never run here."""

    task = celery_app.tasks[TASK]
    assert isinstance(task, SqlAlchemyTask)
    return task


def request(task: SqlAlchemyTask, number: int) -> None:
    with Jobs.of(task.app).session_scope() as session:
        session.execute(insert(ORDERS).values(note=f"order {number}"))


def request_with_job(task: SqlAlchemyTask, number: int) -> None:
    with Jobs.of(task.app).session_scope() as session:
        session.execute(insert(ORDERS).values(note=f"order {number}"))
        task.apply_async_on_commit((number,), session=session)


def job(task: SqlAlchemyTask, number: int) -> None:
    with Jobs.of(task.app).session_scope() as session:
        task.apply_async_on_commit((number,), session=session)


def unpublished_job(task: SqlAlchemyTask, number: int) -> None:
    jobs = Jobs.of(task.app)
    settings = jobs.settings
    jobs.settings = replace(settings, outbox_fast_path=False)
    try:
        job(task, number)
    finally:
        jobs.settings = settings


class PlainInsert:
    """``BEGIN; INSERT; COMMIT`` of a job's row on one raw connection."""

    def __init__(self, task: SqlAlchemyTask) -> None:
        self.connection: Any = Jobs.of(task.app).engine.raw_connection()
        self.max_attempts = Jobs.of(task.app).settings.max_attempts

    def __call__(self, task: SqlAlchemyTask, number: int) -> None:
        now = datetime.now(UTC)
        row = (str(uuid.uuid4()), TASK, json.dumps([number]), self.max_attempts, now, now)
        with self.connection.cursor() as cursor:
            cursor.execute(PLAIN_INSERT, row)
        self.connection.commit()


def timed(task: SqlAlchemyTask, write: Variant, count: int) -> list[float]:
    """Each transaction's seconds."""
    seconds = []
    for number in range(count):
        started = time.perf_counter()
        write(task, number)
        seconds.append(time.perf_counter() - started)
    return seconds


def settle(task: SqlAlchemyTask, variant: str, count: int) -> None:
    """Wait for the publishing thread; check the round's jobs are published
    and the broker holds their messages, then empty the ledger and queue."""
    jobs = Jobs.of(task.app)
    if not jobs.flush(60):
        raise RuntimeError(f"{variant}: the publishing thread did not finish in 60 s")
    with jobs.engine.begin() as connection:
        owed = connection.scalar(select(func.count()).where(Job.published_at.is_(None)))
        if variant in PUBLISHED and owed:
            raise RuntimeError(f"{variant}: {owed} jobs were never marked published")
        connection.execute(Job.__table__.delete())
    depth = stacks.queue_depth(task.app)
    wanted = count if variant in PUBLISHED else 0
    if depth != wanted:
        raise RuntimeError(f"{variant}: the broker holds {depth} messages, not {wanted}")
    task.app.control.purge()


class Run:
    """Each broker's variants' per-round p50 and p99 and transactions a second."""

    def __init__(self) -> None:
        self.rounds: dict[tuple[str, str], list[tuple[float, float, float]]] = {}

    def keep(self, broker: str, variant: str, seconds: list[float]) -> None:
        ordered = sorted(seconds)
        p50 = ordered[len(ordered) // 2]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        self.rounds.setdefault((broker, variant), []).append(
            (p50, p99, len(seconds) / sum(seconds))
        )

    def median(self, broker: str, variant: str, field: int) -> float:
        return statistics.median(r[field] for r in self.rounds[(broker, variant)])


def measure(options: argparse.Namespace, broker: str, broker_url: str, run: Run) -> None:
    with stacks.postgres_database() as database_url:
        proj.jobs.migrations.upgrade(database_url)
        task = make_task(database_url, broker_url)
        jobs = Jobs.of(task.app)
        ORDERS.create(jobs.engine)
        plain = PlainInsert(task)
        writers: dict[str, Variant] = {
            REQUEST: request,
            WITH_JOB: request_with_job,
            JOB: job,
            UNPUBLISHED: unpublished_job,
            PLAIN: plain,
        }
        try:
            for variant in VARIANTS:  # warming up, not kept
                timed(task, writers[variant], options.transactions // 4)
                settle(task, variant, options.transactions // 4)
            for number in range(options.rounds):
                turn = VARIANTS[number % len(VARIANTS) :] + VARIANTS[: number % len(VARIANTS)]
                for variant in turn:
                    seconds = timed(task, writers[variant], options.transactions)
                    settle(task, variant, options.transactions)
                    run.keep(broker, variant, seconds)
                progress(STARTED, f"{broker}: round {number + 1} of {options.rounds} done")
        finally:
            plain.connection.close()
            jobs.dispose()


def table(run: Run, brokers: list[str]) -> str:
    lines = [
        "| broker | variant | p50 ms | p99 ms | transactions/s | × plain INSERT |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for broker in brokers:
        plain = run.median(broker, PLAIN, 2)
        for variant in VARIANTS:
            p50, p99, rate = (run.median(broker, variant, field) for field in range(3))
            lines.append(
                f"| {broker} | {variant} | {p50 * 1000:.2f} | {p99 * 1000:.2f} | {rate:,.0f} "
                f"| {rate / plain:.2f} |"
            )
    return "\n".join(lines)


def verdicts(run: Run, brokers: list[str]) -> str:
    lines = []
    for broker in brokers:
        added = (run.median(broker, WITH_JOB, 0) - run.median(broker, REQUEST, 0)) * 1000
        share = run.median(broker, JOB, 2) / run.median(broker, PLAIN, 2)
        thread = (run.median(broker, JOB, 0) - run.median(broker, UNPUBLISHED, 0)) * 1000
        lines.append(
            f"- {broker}: one job adds {added:.2f} ms to the request's p50 (goal ≤ {ADDED_GOAL}: "
            f"{'yes' if added <= ADDED_GOAL else '**no**'}); `job` runs at {share:.2f}× "
            f"`plain INSERT` (goal ≥ {RATE_GOAL}: {'yes' if share >= RATE_GOAL else '**no**'}); "
            f"the publishing thread, running meanwhile, adds {thread:.2f} ms to `job`'s p50."
        )
    return "\n".join(lines)


def report(options: argparse.Namespace, run: Run, brokers: list[str], version: str) -> str:
    command = (
        f"python -m bench.request{' --quick' if options.quick else ''} "
        f"--transactions {options.transactions} --rounds {options.rounds}"
    )
    minutes = (time.monotonic() - STARTED) / 60
    return (
        f"# What an enqueue adds to a request {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`{command}` at {version}; PostgreSQL {postgres_version()}, {os.cpu_count()} cores, "
        f"load average {LOAD[0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end.\n\n"
        f"Each variant makes {options.transactions:,} transactions a round, one at a time, "
        "each timed from its start to the end of its commit; the figures are the medians of "
        f"{options.rounds} rounds (after one not kept), the variants taking turns. proj runs "
        "on its defaults: the publish and the published mark are the publishing thread's, "
        "which runs meanwhile in the same process; every round's jobs were checked "
        f"published and in the broker.{QUICK_NOTE if options.quick else ''}\n\n"
        f"{table(run, brokers)}\n\n{verdicts(run, brokers)}\n\nThe run took {minutes:.1f} min.\n"
    )


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run, to check it works")
    parser.add_argument("--transactions", type=int, help="transactions a variant a round")
    parser.add_argument("--rounds", type=int, help="rounds kept")
    options = parser.parse_args()
    for name, value in (QUICK if options.quick else FULL).items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    return options


STARTED, LOAD = time.monotonic(), os.getloadavg()


def main() -> None:
    options = parse_options()
    for stack in ("pg-rabbit", "pg-redis"):
        problem = stacks.missing_services(stack)
        if problem:
            sys.exit(f"bench.request needs PostgreSQL, RabbitMQ and Redis: {problem}")
    version, run = proj_version(), Run()
    with stacks.rabbitmq_vhost() as rabbit:
        measure(options, "RabbitMQ", rabbit, run)
    with stacks.redis_database() as redis:
        measure(options, "Redis", redis, run)
    write_report("request-", report(options, run, ["RabbitMQ", "Redis"], version))


if __name__ == "__main__":
    main()
