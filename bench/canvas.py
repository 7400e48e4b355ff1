"""Time Celery canvases from enqueue to the last step's commit: ``python -m
bench.canvas`` (from the repository root), or ``python -m bench.canvas
--quick`` for a smaller one.

A chain of three (``chain(a.s(...), b.s(), c.s())``) and a chord of 100
(``chord([...], callback.s())``), each step the workload's transaction (select a
user, bump its counter, commit; :mod:`bench.workload`), in two variants on
each stack (PostgreSQL + RabbitMQ, PostgreSQL + Redis), each with a ``celery
worker -P prefork -c 2`` subprocess:

- ``baseline``: plain Celery on its own defaults plus a Redis result backend
  (chords need one), ``canvas.apply_async()``; the last step writes the time
  in its own transaction, just before it commits;
- ``proj-full``: proj as a user installs it (``proj.celeryconfig``, the relay
  in the worker, beat beside it), ``enqueue_on_commit(canvas)`` in a session's
  transaction; the last step's commit time is its ledger row's
  ``finished_at``, written in the same transaction just before the commit.

The variants take turns, round by round. A round starts the variant's
worker, waits for a warm-up canvas to complete, then enqueues the canvases
one at a time: each once the one before it has committed its last step (so
each is timed on an idle worker). The time of each step's body (its start
and end, kept in ``bench_users``) says where the time goes. Every round
checks that each canvas completed, that each step's effects committed once
and that each last step ran once. Writes a Markdown report to
``bench/results/canvas-*.md``: about 6 minutes on 2 cores, about 1 with
``--quick``.
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
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery.canvas import Signature
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    create_engine,
    delete,
    select,
)
from sqlalchemy.orm import (
    Session,
)

from bench import stats, workload
from bench.canvas_apps import (
    CHAIN,
    CHORD,
    CHORD_SIZE,
    LAST,
    Base,
    CanvasEnd,
    baseline_app,
    canvas_of,
    proj_app,
)
from bench.run import QUICK_NOTE, progress, proj_version, write_report
from bench.workers import ROOT, WORKER_OPTIONS, process, waker
from proj.config import load_settings
from proj.jobs import Job, Jobs, State, enqueue_on_commit
from proj.jobs.models import ATTEMPTS, JOBS
from proj.migrations import upgrade
from tests import stacks

BASELINE, PROJ = "baseline", "proj-full"
VARIANTS = (BASELINE, PROJ)
APPS = {BASELINE: "bench.canvas_apps:baseline", PROJ: "bench.canvas_apps:proj"}
"""Each variant's app with the canvas tasks on it (``celery -A``)."""
WARM_UP = {CHAIN: 3, CHORD: 5}
"""Steps of the canvases a round starts with, untimed (a chord of 4 then)."""
WARM_UP_STEPS = sum(WARM_UP.values())
TIMEOUT = 30.0
"""Seconds a canvas may take; one that has not completed by then stops its round."""
POLL = 0.01
"""Seconds between the enqueuer's looks for the last step's commit."""
GAP = 0.05
"""Seconds between a canvas's end and the next canvas's enqueue."""
PHASES = {
    CHAIN: ("to first start", "bodies", "between steps", "to commit"),
    CHORD: ("to first start", "header", "header → callback", "callback body", "to commit"),
}
"""Where a canvas's time goes, from its enqueue to its last step's commit."""
HOPS = (
    "first steps: enqueue → published",
    "first steps: published → claimed",
    "released steps: parent's finished_at → published",
    "released steps: published → claimed",
    "all steps: claimed → body start",
)
"""proj's steps, from their ledger rows: the steps a canvas starts with, the
steps a parent's success released, all of them."""
ENQUEUE_TIMEOUT = 900
"""Seconds an enqueuing process may take before its round counts as failed."""
FULL = {"chains": 20, "chords": 3, "runs": 5, "stacks": "pg-rabbit,pg-redis"}
"""What a run measures, unless told otherwise (canvases a variant a round)."""
QUICK = {"chains": 10, "chords": 2, "runs": 1, "stacks": "pg-rabbit,pg-redis"}
"""What a ``--quick`` run measures, unless told otherwise."""


def users_of(chains: int, chords: int) -> list[tuple[str, list[int]]]:
    """Each canvas of a round and its users: every step a user of its own."""
    found, next_user = [], 1
    for kind, count, size in ((CHAIN, chains, 3), (CHORD, chords, CHORD_SIZE + 1)):
        for _ in range(count):
            found.append((kind, list(range(next_user, next_user + size))))
            next_user += size
    return found


def wait_end(connection: Connection, key: str) -> bool:
    """Whether the last step of canvas ``key`` commits within :data:`TIMEOUT`."""
    deadline = time.monotonic() + TIMEOUT
    while not connection.scalar(select(CanvasEnd.id).where(CanvasEnd.key == key).limit(1)):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def enqueue_round(variant: str, chains: int, chords: int) -> dict[str, Any]:
    """In the enqueuing process: a warm-up chain and chord (on user 0, who does
    not exist: they change nothing), then each canvas of the round once the
    one before it has ended. Its canvases' ids and times."""
    app = baseline_app() if variant == BASELINE else proj_app()

    def send(canvas: Signature) -> str | None:
        if variant == BASELINE:
            canvas.apply_async()
            return None
        with Jobs.of(app).session_scope() as session:  # as a web request's would be
            return enqueue_on_commit(canvas, session=session)

    engine = create_engine(os.environ["DATABASE_URL"])
    canvases: list[dict[str, Any]] = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for kind in (CHAIN, CHORD):
            key = f"warm-up-{kind}"
            send(canvas_of(app, kind, [0] * WARM_UP[kind], key))
            if not wait_end(connection, key):
                raise RuntimeError(f"the warm-up {kind} did not complete in {TIMEOUT:g} s")
        time.sleep(1)  # beat and the relay settle
        for kind, users in users_of(chains, chords):
            key = uuid.uuid4().hex
            enqueued_at = time.time()
            canvas_id = send(canvas_of(app, kind, users, key))
            returned_at = time.time()
            done = wait_end(connection, key)
            canvases.append(
                {
                    "kind": kind,
                    "key": key,
                    "users": users,
                    "canvas_id": canvas_id,
                    "enqueued_at": enqueued_at,
                    "returned_at": returned_at,
                    "done": done,
                }
            )
            if not done:
                break
            time.sleep(GAP)
    engine.dispose()
    return {"canvases": canvases}


@contextmanager
def running(variant: str, env: dict[str, str], folder: Path) -> Iterator[None]:
    """A worker for ``variant`` (and beat beside proj's), stopped after; if
    the block fails, the error says how the worker's log ends."""
    celery = [sys.executable, "-m", "celery"]
    name = f"bench-canvas-{variant}-{uuid.uuid4().hex[:6]}@%h"
    command = [*celery, "-A", APPS[variant], "worker", *WORKER_OPTIONS, "-n", name]
    log = folder / f"{variant}.log"
    try:
        with ExitStack() as started:
            started.enter_context(process(command, env, log, wake=waker(env)))
            if variant == PROJ:
                beat = [*celery, "-A", "proj", "beat", "--loglevel", "WARNING"]
                schedule = ["-s", str(folder / "celerybeat-schedule")]
                started.enter_context(process([*beat, *schedule], env, folder / "beat.log"))
            yield
    except Exception as exc:
        raise RuntimeError(
            f"{exc}\n{variant}'s worker log ends:\n{log.read_text()[-3000:]}"
        ) from exc


class Run:
    """What a run found, by stack, kind of canvas and variant."""

    def __init__(self) -> None:
        self.latency: defaultdict[tuple[str, str, str], list[float]] = defaultdict(list)
        """Seconds from enqueue to the last step's commit, a canvas each."""
        self.enqueue: defaultdict[tuple[str, str, str], list[float]] = defaultdict(list)
        """Seconds the enqueue call took (commit and publishing included)."""
        self.phases: defaultdict[tuple[str, str, str, str], list[float]] = defaultdict(list)
        """Seconds in each of :data:`PHASES`, by stack, kind, variant and phase."""
        self.hops: defaultdict[tuple[str, str, str], list[float]] = defaultdict(list)
        """Seconds in each of proj's :data:`HOPS`, by stack, kind and hop."""
        self.steps: Counter[tuple[str, str]] = Counter()
        """Steps the workers ran (warm-ups included), by stack and variant."""
        self.work: dict[tuple[str, str], Counter[str]] = {}
        """What the workers' processes counted (:mod:`bench.stats`), by stack and variant."""
        self.loads: list[float] = []
        """The machine's 1-minute load average as each round began (others share it)."""
        self.problems: list[str] = []


def bodies(session: Session) -> dict[int, tuple[int, float, float]]:
    """Each touched user's runs, its first run's body start and its last run's
    body end (epoch seconds)."""
    query = select(workload.BenchUser).where(workload.BenchUser.touches > 0)
    return {
        user.id: (user.touches, user.first_touched_at.timestamp(), user.touched_at.timestamp())
        for user in session.scalars(query)
        if user.first_touched_at and user.touched_at
    }


def phases(
    kind: str, ran: list[tuple[int, float, float]], enqueued: float, commit: float
) -> list[float]:
    """Seconds in each of :data:`PHASES` ``kind``'s, from its steps' bodies (in order)."""
    starts, ends = [start for _, start, _ in ran], [end for _, _, end in ran]
    if kind == CHAIN:
        spent = [
            starts[0] - enqueued,
            sum(end - start for start, end in zip(starts, ends, strict=True)),
            starts[1] - ends[0] + starts[2] - ends[1],
        ]
    else:
        header_start, header_end = min(starts[:-1]), max(ends[:-1])
        spent = [
            header_start - enqueued,
            header_end - header_start,
            starts[-1] - header_end,
            ends[-1] - starts[-1],
        ]
    return [*spent, commit - ends[-1]]


def hops(
    kind: str,
    users: list[int],
    steps: dict[int, Row[Any]],
    ran: dict[int, tuple[int, float, float]],
    enqueued: float,
) -> Iterator[tuple[str, float]]:
    """Each of :data:`HOPS` a proj canvas's step made, from its ledger row
    (``steps``, by the user the step touched) and its body's start."""
    for number, user in enumerate(users):
        step = steps[user]
        if step.published_at is None or step.started_at is None:
            continue  # the checks say why
        published, claimed = step.published_at.timestamp(), step.started_at.timestamp()
        if kind == CHAIN:
            parents = users[number - 1 : number] if number else []
        else:
            parents = users[:-1] if number == len(users) - 1 else []
        if parents:
            released = max(steps[parent].finished_at.timestamp() for parent in parents)
            yield HOPS[2], published - released
            yield HOPS[3], claimed - published
        else:
            yield HOPS[0], published - enqueued
            yield HOPS[1], claimed - published
        yield HOPS[4], ran[user][1] - claimed


def measure(
    run: Run, stack: str, variant: str, canvases: list[dict[str, Any]], engine: Engine
) -> None:
    """Each canvas's time and phases, from the steps' own records (and for
    proj the ledger's ``finished_at``); what the checks found wrong."""
    canvas_ids = [canvas["canvas_id"] for canvas in canvases if canvas["canvas_id"]]
    with Session(engine) as session:
        ends: defaultdict[str, list[float]] = defaultdict(list)
        for key, finished_at in session.execute(select(CanvasEnd.key, CanvasEnd.finished_at)):
            ends[key].append(finished_at)
        ran = bodies(session)
        steps = session.execute(
            select(
                Job.canvas_id,
                Job.name,
                Job.args,
                Job.state,
                Job.attempts,
                Job.published_at,
                Job.started_at,
                Job.finished_at,
            ).where(Job.canvas_id.in_(canvas_ids))
        ).all()
    committed = {row.canvas_id: row.finished_at.timestamp() for row in steps if row.name == LAST}
    by_user: defaultdict[str, dict[int, Row[Any]]] = defaultdict(dict)
    for row in steps:
        by_user[row.canvas_id][row.args[-2]] = row  # (given, user, key)
    wrong = Counter(
        row.canvas_id for row in steps if row.state != State.SUCCEEDED or row.attempts != 1
    )
    where = f"{stack} {variant}"
    for canvas in canvases:
        kind, key, canvas_id = canvas["kind"], canvas["key"], canvas["canvas_id"]
        if not canvas["done"]:
            run.problems.append(f"{where}: a {kind} did not complete in {TIMEOUT:g} s ({key})")
            continue
        if len(ends[key]) != 1:
            run.problems.append(f"{where}: a {kind}'s last step committed {len(ends[key])} times")
        if wrong[canvas_id]:
            run.problems.append(
                f"{where}: {wrong[canvas_id]} steps of a {kind} did not succeed at attempt 1"
            )
        found = [ran.get(user, (0, 0.0, 0.0)) for user in canvas["users"]]
        if any(runs != 1 for runs, _, _ in found):
            run.problems.append(f"{where}: a {kind}'s steps did not each commit once ({key})")
            continue
        enqueued = canvas["enqueued_at"]
        commit = committed[canvas_id] if variant == PROJ else min(ends[key])
        group = (stack, kind, variant)
        run.latency[group].append(commit - enqueued)
        run.enqueue[group].append(canvas["returned_at"] - enqueued)
        for phase, seconds in zip(PHASES[kind], phases(kind, found, enqueued, commit), strict=True):
            run.phases[(*group, phase)].append(seconds)
        if variant == PROJ:
            for hop, seconds in hops(kind, canvas["users"], by_user[canvas_id], ran, enqueued):
                run.hops[(stack, kind, hop)].append(seconds)
    named = {user for canvas in canvases for user in canvas["users"]}
    extra = sum(1 for user in ran if user not in named)
    if extra:
        run.problems.append(f"{where}: {extra} users touched that no canvas named")


def clear(engine: Engine) -> None:
    """No job rows, no ends, every user untouched."""
    workload.clear(engine)
    with engine.begin() as connection:
        connection.execute(delete(CanvasEnd))
        connection.execute(delete(ATTEMPTS))
        connection.execute(delete(JOBS))


def enqueue(variant: str, options: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Run :func:`enqueue_round` for ``variant`` in a process of its own, as a
    user's application would; its report."""
    command = ["bench.canvas", "--enqueue", variant, "--chains", str(options.chains)]
    done = subprocess.run(
        [sys.executable, "-m", *command, "--chords", str(options.chords)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=ENQUEUE_TIMEOUT,
    )
    if done.returncode:
        said = done.stderr.strip().splitlines() or ["(nothing on stderr)"]
        raise RuntimeError(f"enqueueing failed: {said[-1]}\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def wait_for_services(stack: str, within: float = 120.0) -> None:
    """Wait until ``stack``'s servers answer again (for up to ``within`` seconds)."""
    deadline = time.monotonic() + within
    while stacks.missing_services(stack) and time.monotonic() < deadline:
        time.sleep(1)


def run_stack(run: Run, stack: str, options: argparse.Namespace, started: float) -> None:
    """Every variant's rounds on a new ``stack``, taking turns."""
    with ExitStack() as made_here:
        folder = Path(made_here.enter_context(tempfile.TemporaryDirectory()))
        made = made_here.enter_context(stacks.stack(stack, folder))
        # The baseline's results: the broker's Redis database, or one of their own.
        results = made_here.enter_context(
            nullcontext(made["CELERY_BROKER_URL"])
            if stack == "pg-redis"
            else stacks.redis_database()
        )
        settings = load_settings(made)
        env = {**os.environ, **made, "PYTHONPATH": str(ROOT), "DATABASE_URL": settings.database_url}
        envs = {
            BASELINE: {**env, "CELERY_RESULT_BACKEND": results},
            PROJ: {**env, "CELERY_RESULT_BACKEND": settings.result_backend},
        }
        upgrade(settings.database_url)
        engine = create_engine(settings.database_url)
        workload.reset(engine)
        Base.metadata.create_all(engine)
        counting = {variant: folder / f"stats-{variant}" for variant in VARIANTS}
        for found in counting.values():
            found.mkdir()
        for number in range(1, options.runs + 1):
            for variant in VARIANTS:
                counted = str(counting[variant])
                clear(engine)
                run.loads.append(os.getloadavg()[0])
                known = len(run.problems)
                try:
                    with running(variant, {**envs[variant], "BENCH_STATS_DIR": counted}, folder):
                        report = enqueue(variant, options, envs[variant])
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    # A round lost (a broker restarted under it, say): said, and the run goes on.
                    print(exc, file=sys.stderr)
                    run.problems.append(
                        f"{stack} {variant} round {number}: {str(exc).splitlines()[0]}"
                    )
                    wait_for_services(stack)
                else:
                    measure(run, stack, variant, report["canvases"], engine)
                    steps = WARM_UP_STEPS + sum(len(c["users"]) for c in report["canvases"])
                    run.steps[(stack, variant)] += steps
                progress(started, f"{stack} {variant} round {number} done")
                for problem in run.problems[known:]:
                    progress(started, f"check failed: {problem}")
        for variant, found in counting.items():
            run.work[(stack, variant)] = stats.collected(found)
        engine.dispose()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def latency_table(run: Run) -> list[str]:
    """The canvases' times a stack, kind and variant, against the baseline."""
    lines = [
        "| Stack | Canvas | Variant | Canvases | Enqueue call p50 ms | Enqueue → last commit "
        "p50 ms | p99 ms | max ms | × baseline p50 | × baseline p99 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (stack, kind, variant), found in run.latency.items():
        p50, p99 = statistics.median(found), percentile(found, 0.99)
        base = run.latency.get((stack, kind, BASELINE))
        ratios = "— | —"
        if base and variant != BASELINE:
            ratios = f"{p50 / statistics.median(base):.2f} | {p99 / percentile(base, 0.99):.2f}"
        call = statistics.median(run.enqueue[(stack, kind, variant)])
        figures = f"{ms(call)} | {ms(p50)} | {ms(p99)} | {ms(max(found))}"
        lines.append(f"| {stack} | {kind} | {variant} | {len(found)} | {figures} | {ratios} |")
    return lines


def phase_tables(run: Run) -> list[str]:
    """Where each kind of canvas's time goes: the median of each phase."""
    lines = []
    for kind, phases in PHASES.items():
        lines += [
            "",
            f"Where a {kind}'s time goes, p50 ms a phase:",
            "",
            f"| Stack | Variant | {' | '.join(phases)} |",
            f"|---|---|{'---:|' * len(phases)}",
        ]
        for stack, found_kind, variant in run.latency:
            if found_kind == kind:
                spent = (statistics.median(run.phases[(stack, kind, variant, p)]) for p in phases)
                lines.append(f"| {stack} | {variant} | {' | '.join(ms(s) for s in spent)} |")
    return lines


def hop_table(run: Run) -> list[str]:
    """proj's steps from their ledger rows: the median of each hop."""
    lines = [
        "",
        "proj-full's steps from their ledger rows, p50 ms: the steps a canvas starts with, "
        "then those a parent's success released, then all:",
        "",
        f"| Stack | Canvas | {' | '.join(HOPS)} |",
        f"|---|---|{'---:|' * len(HOPS)}",
    ]
    for stack, kind in dict.fromkeys((stack, kind) for stack, kind, _ in run.hops):
        taken = (run.hops.get((stack, kind, hop), []) for hop in HOPS)
        shown = (ms(statistics.median(found)) if found else "—" for found in taken)
        lines.append(f"| {stack} | {kind} | {' | '.join(shown)} |")
    return lines


def work_table(run: Run) -> list[str]:
    """The workers' database work a step, by stack and variant."""
    lines = [
        "",
        "The workers' database work a step (every process of the worker, the relay in "
        "proj's included; all rounds, warm-ups included; counted as `bench.run` counts it):",
        "",
        "| Stack | Variant | Steps | SQL statements a step | Round trips a step |",
        "|---|---|---:|---:|---:|",
    ]
    for (stack, variant), counted in run.work.items():
        steps = run.steps[(stack, variant)]
        if steps:
            statements, trips = counted["statements"] / steps, counted["round_trips"] / steps
            lines.append(f"| {stack} | {variant} | {steps} | {statements:.1f} | {trips:.1f} |")
    return lines


def tables(run: Run) -> str:
    return "\n".join([*latency_table(run), *phase_tables(run), *hop_table(run), *work_table(run)])


def report(options: argparse.Namespace, run: Run, minutes: float, version: str) -> str:
    command = (
        f"python -m bench.canvas{' --quick' if options.quick else ''} --chains "
        f"{options.chains} --chords {options.chords} --runs {options.runs} "
        f"--stacks {options.stacks}"
    )
    failed = "".join(f"- {problem}\n" for problem in run.problems)
    if failed:
        failed = f"\nChecks that failed:\n\n{failed}"
    return (
        f"# Canvases {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`{command}` at {version}; worker `celery worker -P prefork -c 2`, "
        f"{os.cpu_count()} cores.\n\n"
        f"A round enqueues {options.chains} chains of 3 then {options.chords} chords of "
        f"{CHORD_SIZE} a variant, one at a time on a warm, idle worker (each once the one "
        "before it has committed its last step), every step a transaction on a user of "
        "its own. `baseline`: plain Celery on its defaults plus a Redis result backend, "
        "`apply_async()`; the last step's commit is the time it writes in its own "
        "transaction just before committing. `proj-full`: proj's defaults (the relay in "
        "the worker, beat beside it), `enqueue_on_commit(canvas, session=...)` in a "
        "session's transaction; the last step's commit is its ledger row's `finished_at`, "
        "written in the same transaction just before the commit. The enqueue call's time "
        "includes its commit and publishing the first steps. p99 is over all rounds (with "
        "fewer than 100 canvases, the slowest). The variants take turns, round by round "
        f"({options.runs} round{'s' if options.runs > 1 else ''}); the machine's "
        "1-minute load average as the rounds began: "
        f"{min(run.loads, default=0):.1f} to {max(run.loads, default=0):.1f}."
        f"{QUICK_NOTE if options.quick else ''}\n\n"
        f"{tables(run)}\n\n"
        "The phases come from each step's body (its start and end, in `bench_users`): "
        "*to first start* is enqueue to the first step's body, *between steps* the two "
        "hops from one step's body end to the next one's start (its commit, the next "
        "message's publish and delivery, and for proj the claim), *header → callback* the "
        "last header body's end to the callback's start, *to commit* the last body's end "
        "to the commit time. In proj's ledger, a step is *claimed* as its run begins, "
        "before its body (`started_at`, committed at once), and *published* when the "
        "publisher has sent its batch (`published_at`: for a chord's header, after all "
        "100 messages, so its *published → claimed* is mostly waiting for a free worker "
        "process); a parent's `finished_at` is taken in its transaction just before the "
        f"release, flush and commit.\n{failed}\n"
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
    parser.add_argument("--chains", type=int, help=f"chains a variant a round ({FULL['chains']})")
    parser.add_argument("--chords", type=int, help=f"chords a variant a round ({FULL['chords']})")
    parser.add_argument("--runs", type=int, help=f"rounds (default {FULL['runs']})")
    parser.add_argument("--stacks", help=f"default {FULL['stacks']}")
    # How the runner enqueues a round, in a process of its own.
    parser.add_argument("--enqueue", choices=VARIANTS, help=argparse.SUPPRESS)
    options = parser.parse_args()
    for name, value in (QUICK if options.quick else FULL).items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    if options.chains * 3 + options.chords * (CHORD_SIZE + 1) > workload.USERS:
        parser.error(f"3 users a chain and {CHORD_SIZE + 1} a chord: {workload.USERS} at most")
    return options


def main() -> None:
    options = parse_options()
    if options.enqueue:
        print(json.dumps(enqueue_round(options.enqueue, options.chains, options.chords)))
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
    write_report("canvas-", report(options, run, minutes, version))


if __name__ == "__main__":
    main()
