"""Measure how late a job with a countdown starts: ``python -m bench.schedule``
(from the repository root), or ``python -m bench.schedule --quick`` for a
smaller one.

Two variants, on each stack (PostgreSQL + RabbitMQ, PostgreSQL + Redis), on
their library's defaults as installed, each with a ``celery worker -P prefork
-c 2`` subprocess (:mod:`bench.workers`):

- ``baseline``: plain Celery (:mod:`bench.baseline`), ``apply_async(countdown=...)``:
  the broker carries a message with an ETA, which the worker holds until then;
- ``proj-full``: proj as a user installs it (``proj.celeryconfig``, the relay
  in the worker, beat beside it), ``apply_async_on_commit(countdown=...)``;
  and jobs whose rows were written a month ago: enqueued with an ETA 30 days
  out, their ``created_at`` set back 30 days, then their due time
  (``available_at``) moved to a few seconds ahead with an UPDATE.

The variants take turns, round by round. A round starts the variant's
worker, enqueues jobs whose due times are spread evenly over the next 2 to
10 seconds, and waits until every job has run, or until 30 seconds after the
last was due (a job that has not got there by then counts as later than
that). Lateness is measured against each job's due time: for proj from its
ledger row (``published_at - available_at``, when the broker took the
message, and ``started_at - available_at``, the claim just before the
task's body runs), for the baseline from the task's body (its start minus
the ETA, kept in ``bench_users``). The goal: p99 publish lateness under 1 s.
Writes a Markdown report to ``bench/results/schedule-*.md``: about 4
minutes on 2 cores, about 1 with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, delete, func, select, update

from bench import workload
from bench.run import QUICK_NOTE, progress, proj_version, write_report
from bench.workers import ROOT, variant_env, worker
from proj.config import load_settings
from proj.jobs import Job, ProjError
from proj.jobs.models import ATTEMPTS, JOBS, State
from proj.migrations import upgrade
from tests import stacks

BASELINE, PROJ = "baseline", "proj-full"
TASK = "bench.touch"
"""The jobs measured (beat enqueues the reference application's own beside them)."""
VARIANTS = (BASELINE, PROJ)
COUNTDOWN = (2.0, 10.0)
"""Seconds ahead the jobs of a round fall due: spread evenly over this span."""
MONTH = timedelta(days=30)
SETTLE = 30.0
"""Seconds after the last due time a round waits for jobs still to run."""
GOAL = 1.0
"""Seconds: the p99 publish lateness proj promises."""
FULL = {"jobs": 300, "old_jobs": 100, "runs": 3, "stacks": "pg-rabbit,pg-redis"}
"""What a run measures, unless told otherwise (jobs and old jobs a round)."""
QUICK = {"jobs": 100, "old_jobs": 20, "runs": 1, "stacks": "pg-rabbit,pg-redis"}
"""What a ``--quick`` run measures, unless told otherwise."""

Key = tuple[str, str, str, str]
"""Stack, variant, kind of job (``countdown`` or ``month-old``), and what was
late (``publish`` or ``start``)."""


class Run:
    """What a run found: each job's lateness in seconds (``inf`` for one that
    had not got there when its round stopped waiting), round by round;
    refusals; failed checks."""

    def __init__(self) -> None:
        self.lateness: defaultdict[Key, list[list[float]]] = defaultdict(list)
        self.loads: list[float] = []
        """The machine's 1-minute load average as each round began (others share it)."""
        self.refused: dict[str, str] = {}
        """By stack: why proj refused the month-old jobs' ETA at enqueue."""
        self.problems: list[str] = []


def due_in(number: int, count: int) -> float:
    """Seconds ahead job ``number`` of ``count`` falls due (spread over :data:`COUNTDOWN`)."""
    first, last = COUNTDOWN
    return first + (last - first) * number / max(count - 1, 1)


def enqueue_jobs(variant: str, jobs: int, old_jobs: int) -> dict[str, Any]:
    """In the enqueuing process: for proj, ``old_jobs`` jobs with an ETA a
    month out (users after the first ``jobs``); then ``jobs`` jobs with their
    countdowns, each given its due time as the task's ``enqueued_at``, so the
    task records its own lateness. The old jobs' ids, and why proj refused
    them, if it did."""
    if variant == BASELINE:
        from bench.baseline import touch as plain

        for number in range(jobs):
            countdown = due_in(number, jobs)
            plain.apply_async((number + 1, time.time() + countdown), countdown=countdown)
        return {"old_ids": [], "refused": None}
    import proj.celery  # noqa: F401  (proj's app becomes the default)
    from bench.proj_touch import touch
    from proj.db import session_scope

    old_ids, refused = [], None
    try:
        for user in range(jobs + 1, jobs + old_jobs + 1):
            with session_scope() as session:  # a transaction a job, as a request's
                eta = datetime.now(UTC) + MONTH
                old_ids.append(touch.apply_async_on_commit((user, 0.0), eta=eta, session=session))
    except ProjError as exc:
        refused = str(exc)
    for number in range(jobs):
        countdown = due_in(number, jobs)
        due = time.time() + countdown
        with session_scope() as session:
            touch.apply_async_on_commit((number + 1, due), countdown=countdown, session=session)
    return {"old_ids": old_ids, "refused": refused}


def enqueue(variant: str, options: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Run :func:`enqueue_jobs` for ``variant`` in a process of its own, as a
    user's application would; its report."""
    command = ["bench.schedule", "--enqueue", variant, "--jobs", str(options.jobs)]
    done = subprocess.run(
        [sys.executable, "-m", *command, "--old-jobs", str(options.old_jobs)],
        env=variant_env(variant, env),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"enqueueing {variant}'s jobs failed:\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def move_due_times(engine: Engine, job_ids: list[str]) -> None:
    """Make these jobs' rows a month old, and due over the next seconds
    (spread over :data:`COUNTDOWN`), as an operator moving a job's due time would."""
    now = datetime.now(UTC)
    due = [
        {"job": job_id, "due": now + timedelta(seconds=due_in(number, len(job_ids)))}
        for number, job_id in enumerate(job_ids)
    ]
    moved = (
        update(JOBS)
        .where(JOBS.c.id == bindparam("job"))
        .values(created_at=JOBS.c.created_at - MONTH, available_at=bindparam("due"))
    )
    with engine.begin() as connection:
        connection.execute(moved, due)


def wait_run(engine: Engine, count: int) -> None:
    """Wait until ``count`` jobs have run, or :data:`SETTLE` seconds after the
    last due time of jobs enqueued just now."""
    deadline = time.monotonic() + COUNTDOWN[1] + SETTLE
    while sum(workload.touches(engine).values()) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def clear(engine: Engine) -> None:
    """No job rows, every user untouched."""
    workload.clear(engine)
    with engine.begin() as connection:
        connection.execute(delete(ATTEMPTS))
        connection.execute(delete(JOBS))


def ledger_lateness(run: Run, stack: str, engine: Engine) -> None:
    """Each proj job's publish and start lateness, from its row; a job that
    ran more than once, or did not succeed, is a failed check."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(Job.created_at, Job.available_at, Job.published_at, Job.started_at).where(
                Job.name == TASK
            )
        ).all()
        wrong = connection.scalar(
            select(func.count()).where(
                Job.name == TASK, (Job.state != State.SUCCEEDED) | (Job.attempts != 1)
            )
        )
    month_ago = datetime.now(UTC) - MONTH / 2
    found: defaultdict[Key, list[float]] = defaultdict(list)
    for row in rows:
        kind = "month-old" if row.created_at < month_ago else "countdown"
        for what, moment in (("publish", row.published_at), ("start", row.started_at)):
            late = math.inf if moment is None else (moment - row.available_at).total_seconds()
            found[(stack, PROJ, kind, what)].append(late)
    for key, late in found.items():
        run.lateness[key].append(late)
    if wrong:
        run.problems.append(f"{stack} {PROJ}: {wrong} jobs not succeeded at their first attempt")


def task_lateness(run: Run, stack: str, engine: Engine, jobs: int) -> None:
    """Each baseline task's start lateness, as it recorded it; a user touched
    more than once is a failed check."""
    late = [ms / 1000 for ms in workload.latencies(engine)]
    run.lateness[(stack, BASELINE, "countdown", "start")].append(
        late + [math.inf] * (jobs - len(late))
    )
    twice = sum(1 for count in workload.touches(engine).values() if count > 1)
    if twice:
        run.problems.append(f"{stack} {BASELINE}: {twice} tasks ran more than once")


def round_of(
    run: Run, stack: str, variant: str, options: argparse.Namespace, env: dict[str, str]
) -> None:
    """One round of ``variant``: a new worker, the jobs enqueued once it is
    ready, then waited for."""
    engine = create_engine(env["DATABASE_URL"])
    clear(engine)
    run.loads.append(os.getloadavg()[0])
    with worker(variant, env, Path(env["PROJ_DATA_DIR"])):
        report = enqueue(variant, options, env)
        if report["old_ids"]:
            move_due_times(engine, report["old_ids"])
        if report["refused"]:
            run.refused[stack] = report["refused"]
        wait_run(engine, options.jobs + len(report["old_ids"]))
    if variant == PROJ:
        ledger_lateness(run, stack, engine)
    else:
        task_lateness(run, stack, engine, options.jobs)
    engine.dispose()


def run_stack(run: Run, stack: str, options: argparse.Namespace, started: float) -> None:
    """Every variant's rounds on a new ``stack``, taking turns."""
    with tempfile.TemporaryDirectory() as name, stacks.stack(stack, Path(name)) as made:
        settings = load_settings(made)
        env = {
            **os.environ,
            **made,
            "PYTHONPATH": str(ROOT),
            # Resolved to the driver proj ships, as every process must read
            # them (the baseline's Celery reads CELERY_RESULT_BACKEND itself).
            "DATABASE_URL": settings.database_url,
            "CELERY_RESULT_BACKEND": settings.result_backend,
        }
        upgrade(settings.database_url)
        engine = create_engine(settings.database_url)
        workload.reset(engine)
        engine.dispose()
        for number in range(1, options.runs + 1):
            for variant in VARIANTS:
                round_of(run, stack, variant, options, env)
                progress(started, f"{stack} {variant} round {number} done")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def shown(seconds: float) -> str:
    return f"> {SETTLE:g} s" if math.isinf(seconds) else f"{seconds * 1000:,.0f} ms"


def table(run: Run) -> str:
    """One line a stack, variant, kind of job and lateness measured."""
    lines = [
        "| Stack | Variant | Jobs | Lateness of | Measured | p50 | p99 | max | Over 1 s "
        "| p99 by round | p99 < 1 s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (stack, variant, kind, what), rounds in run.lateness.items():
        late = [seconds for found in rounds for seconds in found]
        p99 = percentile(late, 0.99)
        goal = ("yes" if p99 < GOAL else "**no**") if what == "publish" else ""
        figures = " | ".join(shown(v) for v in (percentile(late, 0.5), p99, max(late)))
        key = f"{stack} | {variant} | {kind} | {what}"
        over = sum(1 for v in late if v > GOAL)
        by_round = " / ".join(shown(percentile(found, 0.99)) for found in rounds)
        lines.append(f"| {key} | {len(late)} | {figures} | {over} | {by_round} | {goal} |")
    for stack in run.refused:
        refused = f"| {stack} | {PROJ} | month-old | refused at enqueue | 0 |"
        lines.append(f"{refused} | | | | | **no** |")
    return "\n".join(lines)


def report(options: argparse.Namespace, run: Run, minutes: float, version: str) -> str:
    command = (
        f"python -m bench.schedule{' --quick' if options.quick else ''} --jobs {options.jobs} "
        f"--old-jobs {options.old_jobs} --runs {options.runs} --stacks {options.stacks}"
    )
    refused = "".join(
        f"\nOn {stack}, proj refused the month-old jobs' ETA at enqueue: {why}\n"
        for stack, why in run.refused.items()
    )
    failed = "".join(f"- {problem}\n" for problem in run.problems)
    if failed:
        failed = f"\nChecks that failed:\n\n{failed}"
    return (
        f"# Due-time precision {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`{command}` at {version}; worker `celery worker -P prefork -c 2`, "
        f"{os.cpu_count()} cores.\n\n"
        f"A round enqueues {options.jobs} jobs a variant due over the next "
        f"{COUNTDOWN[0]:g} to {COUNTDOWN[1]:g} s, with a worker already running: "
        "`baseline` with plain Celery's `apply_async(countdown=...)`, `proj-full` with "
        "`apply_async_on_commit(countdown=...)` on proj's defaults (the relay in the "
        f"worker). `proj-full` also enqueues {options.old_jobs} *month-old* jobs a round: "
        "an ETA 30 days out, the row's `created_at` set back 30 days, then its "
        "`available_at` moved to a few seconds ahead. Lateness is against the due time: "
        "*publish* when the broker took the message (`published_at`), *start* when the "
        "job was claimed (`started_at`, just before its body), or for the baseline "
        "when its body started; `published_at` is written once the broker has confirmed "
        "the message's whole batch, so a job may start before it. The variants take "
        "turns, round by round "
        f"({options.runs} round{'s' if options.runs > 1 else ''}). A job that had not "
        f"got there {SETTLE:g} s after the round's last due time shows as later than "
        "that. The machine's 1-minute load average as the rounds began: "
        f"{min(run.loads, default=0):.1f} to {max(run.loads, default=0):.1f}."
        f"{QUICK_NOTE if options.quick else ''}\n\n"
        f"{table(run)}\n{refused}{failed}\n"
        f"The run took {minutes:.1f} min.\n"
    )


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes (about a minute): "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--jobs", type=int, help=f"jobs a variant a round ({FULL['jobs']})")
    parser.add_argument(
        "--old-jobs", type=int, help=f"month-old jobs a round, proj only ({FULL['old_jobs']})"
    )
    parser.add_argument("--runs", type=int, help=f"rounds (default {FULL['runs']})")
    parser.add_argument("--stacks", help=f"default {FULL['stacks']}")
    # How the runner enqueues a round, in a process of its own.
    parser.add_argument("--enqueue", choices=VARIANTS, help=argparse.SUPPRESS)
    options = parser.parse_args()
    for name, value in (QUICK if options.quick else FULL).items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    if options.jobs + options.old_jobs > workload.USERS:
        parser.error(f"--jobs and --old-jobs may add up to {workload.USERS} at most")
    return options


def main() -> None:
    options = parse_options()
    if options.enqueue:
        print(json.dumps(enqueue_jobs(options.enqueue, options.jobs, options.old_jobs)))
        return
    started = time.monotonic()
    version = proj_version()
    run = Run()
    for stack in options.stacks.split(","):
        problem = stacks.missing_services(stack)
        if problem:
            print(f"skipping {stack}: {problem}", file=sys.stderr)
            continue
        run_stack(run, stack, options, started)
    minutes = (time.monotonic() - started) / 60
    write_report("schedule-", report(options, run, minutes, version))


if __name__ == "__main__":
    main()
