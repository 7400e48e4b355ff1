"""Run the benchmark: ``python -m bench.run`` (from the repository root).

For each stack (PostgreSQL + RabbitMQ, PostgreSQL + Redis, embedded SQLite)
and each variant, a ``celery worker -P prefork -c 2`` subprocess drains the
workload (:mod:`bench.workload`):

- ``baseline``: plain Celery, the classic session recipe, ``delay()``;
- ``proj``: the same task on ``SqlAlchemyTask``, ``delay()``;
- ``proj-full``: ``delay_on_commit`` through the ledger (claims, late acks,
  relay in the worker, beat running the reconciler). On SQLite this is the
  embedded setup.

Beside them, in the same run, the limits: ``pgbench`` running the task's
transaction with 2 clients, a raw kombu publish and consume loop with no
database, and the relay's publish rate with the fast path off. While each
drain runs, the CPU time of the worker's processes, PostgreSQL's and the
broker's is counted per task. The proj-full worker's memory is measured after
1,000 tasks and after ``--rss-tasks``. Figures are ratios against those
measured in the same run; every run also checks that each user's counter
equals the tasks sent to it. Writes a Markdown table to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
from kombu import Connection, Consumer, Exchange, Producer, Queue
from sqlalchemy import Engine, create_engine, delete, insert, make_url, text

from bench import stats, workload
from proj.celery import make_celery
from proj.config import load_settings
from proj.jobs import Jobs
from proj.jobs.models import Job, State
from proj.jobs.relay import make_relay
from proj.migrations import upgrade
from tests import stacks

ROOT = Path(__file__).resolve().parents[1]
WORKER_OPTIONS = [
    "-P",
    "prefork",
    "-c",
    "2",
    "--without-heartbeat",
    "--without-mingle",
    "--without-gossip",
    "--loglevel",
    "WARNING",
]
OBSERVED = ("proj-full-info", "proj-full-observed")
"""proj-full at log level INFO: with text logs and no tracing, and with JSON
logs and OpenTelemetry traces exported over OTLP (to a sink in this process)."""
APP = {
    "baseline": ["-A", "bench.baseline"],
    **{v: ["-A", "proj"] for v in ("proj", "proj-full", *OBSERVED)},
}
INCLUDE = {
    "baseline": [],
    **{v: ["--include", "bench.proj_touch"] for v in ("proj", "proj-full", *OBSERVED)},
}
SERVER_PROCESSES = {"postgres": "postgres", "beam.smp": "broker", "redis-server": "broker"}
"""What each server process's CPU is counted as (RabbitMQ runs as ``beam.smp``)."""
LATENCY_TASKS = 200
RSS_WARMUP = 1000
RSS_BATCH = 50
PGBENCH_SCRIPT = """\\set id random(1, 1000)
BEGIN;
SELECT id, touches, first_touched_at FROM bench_users WHERE id = :id;
UPDATE bench_users SET touches = touches + 1, touched_at = now() WHERE id = :id;
COMMIT;
"""


@dataclass
class Figures:
    stack: str
    variant: str
    enqueue_rates: list[float] = field(default_factory=list)
    drain_rates: list[float] = field(default_factory=list)
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    statements: float = 0.0
    """Worker-side SQL statements per task."""
    round_trips: float = 0.0
    """Worker-side round trips to the database per task (see :mod:`bench.stats`)."""
    enqueue_statements: float = 0.0
    connections_at_rest: int | None = None
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    """CPU milliseconds per task while draining: the worker (all its
    processes), PostgreSQL (every server process) and the broker."""
    rss_mb: tuple[float, float] | None = None
    """The worker's memory (all its processes) after 1,000 and after ``--rss-tasks`` tasks."""
    correct: bool = True

    @property
    def drain(self) -> float:
        return statistics.median(self.drain_rates)


@contextmanager
def process(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        yield child
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()


@contextmanager
def worker(variant: str, env: dict[str, str], folder: Path) -> Iterator[int]:
    """A running worker for ``variant`` (and beat, for proj-full); its pid."""
    ready = folder / f"{variant}.ready"
    ready.unlink(missing_ok=True)
    env = {**variant_env(variant, env), "BENCH_READY_FILE": str(ready)}
    celery = [sys.executable, "-m", "celery", *APP[variant]]
    command = [
        *celery,
        "worker",
        *INCLUDE[variant],
        *WORKER_OPTIONS,
        *(["--loglevel", "INFO"] if variant in OBSERVED else []),
        "-n",
        f"bench-{variant}-{uuid.uuid4().hex[:6]}@%h",
    ]
    with ExitStack() as running:
        main = running.enter_context(process(command, env, folder / f"{variant}.log"))
        if variant.startswith("proj-full"):
            beat = [
                *celery,
                "beat",
                "--loglevel",
                "WARNING",
                "-s",
                str(folder / "celerybeat-schedule"),
            ]
            running.enter_context(process(beat, env, folder / "beat.log"))
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline:
                raise RuntimeError((folder / f"{variant}.log").read_text())
            time.sleep(0.1)
        time.sleep(1)  # let the pool's children finish starting
        yield main.pid


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@cache
def otlp_sink() -> str:
    """The URL of a trace sink served from a thread of this process."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/v1/traces"


def variant_env(variant: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` as ``variant`` runs with (enqueuer and worker alike)."""
    if variant != "proj-full-observed":
        return env
    return {
        **env,
        "PROJ_LOG_FORMAT": "json",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_sink(),
    }


def enqueue(
    variant: str,
    count: int,
    env: dict[str, str],
    interval: float = 0.0,
    per_transaction: int = 1,
) -> dict[str, float]:
    command = ["bench.enqueue", variant, str(count), str(interval), str(per_transaction)]
    done = subprocess.run(
        [sys.executable, "-m", *command],
        env=variant_env(variant, env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    report: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
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


def measure(
    stack: str,
    variant: str,
    env: dict[str, str],
    engine: Engine,
    tasks: int,
    runs: int,
    folder: Path,
) -> Figures:
    figures = Figures(stack, variant)
    stats_dir = folder / f"stats-{variant}"
    stats_dir.mkdir()
    env = {**env, "BENCH_STATS_DIR": str(stats_dir)}
    enqueued = []
    for _ in range(runs):
        # Enqueue into an idle queue, then drain it: neither rate caps the other.
        workload.clear(engine)
        report = enqueue(variant, tasks, env)
        enqueued.append(report)
        figures.enqueue_rates.append(report["count"] / report["seconds"])
        with worker(variant, env, folder) as pid:
            before, ran = cpu_seconds(pid), sum(workload.touches(engine).values())
            wait_drained(engine, tasks)
            for part, seconds in cpu_seconds(pid).items():
                if stack == "sqlite" and part != "worker":
                    continue  # no servers: the worker holds the database and the broker
                per_task = 1000 * (seconds - before[part]) / (tasks - ran)
                figures.cpu_ms.setdefault(part, []).append(per_task)
        figures.drain_rates.append(tasks / workload.drain_seconds(engine))
        figures.correct &= workload.touches(engine) == expected(tasks)
    with worker(variant, env, folder):
        workload.clear(engine)
        enqueue(variant, LATENCY_TASKS, env, interval=0.02)
        wait_drained(engine, LATENCY_TASKS)
        latencies = workload.latencies(engine)
        figures.latency_p50 = statistics.median(latencies)
        figures.latency_p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        figures.correct &= workload.touches(engine) == expected(LATENCY_TASKS)
        time.sleep(2)
        figures.connections_at_rest = connections(engine)
    done = stats.collected(stats_dir)
    ran = runs * tasks + LATENCY_TASKS
    figures.statements = done["statements"] / ran
    figures.round_trips = done["round_trips"] / ran
    figures.enqueue_statements = sum(r.get("statements", 0) for r in enqueued) / (runs * tasks)
    if engine.dialect.name == "postgresql":
        time.sleep(1)
        figures.correct &= connections(engine) == 0  # the worker left nothing behind
    return figures


def cpu_seconds(worker_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the worker's processes, by PostgreSQL's and
    by the broker's. On a machine this small the drain is bound by the CPU
    all of them need per task, not by any one process."""
    main = psutil.Process(worker_pid)
    mine = {worker_pid, *(child.pid for child in main.children(recursive=True))}
    used = {"worker": 0.0, "postgres": 0.0, "broker": 0.0}
    for found in psutil.process_iter(["name", "cpu_times"]):
        times = found.info["cpu_times"]
        part = "worker" if found.pid in mine else SERVER_PROCESSES.get(found.info["name"])
        if part and times is not None:
            used[part] += times.user + times.system
    return used


def worker_rss_mb(pid: int) -> float:
    """Resident memory of a worker's main process and children, in MiB."""
    main = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [main, *main.children(recursive=True)]) / 2**20


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


def pgbench_tps(database_url: str, folder: Path, seconds: int = 10) -> float:
    """Transactions a second of the task's own transaction, run by ``pgbench``
    with 2 clients (no Celery, no Python): the database's limit here."""
    url = make_url(database_url)
    script = folder / "touch.sql"
    script.write_text(PGBENCH_SCRIPT)
    done = subprocess.run(
        [
            "pgbench",
            "-n",
            "-c",
            "2",
            "-j",
            "2",
            "-T",
            str(seconds),
            "-f",
            str(script),
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port or 5432),
            "-U",
            url.username or "postgres",
            url.database or "postgres",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if found is None:
        raise RuntimeError(f"pgbench printed no tps:\n{done.stdout}{done.stderr}")
    return float(found.group(1))


def relay_rate(env: dict[str, str], count: int) -> float:
    """Jobs a second the relay publishes, with the fast path off."""
    settings = load_settings({**env, "PROJ_OUTBOX_FAST_PATH": "0"})
    celery_app = make_celery(settings)
    engine = Jobs.of(celery_app).engine
    queue = f"bench-relay-{uuid.uuid4().hex[:8]}"
    outbox = make_relay(celery_app)
    rows = [
        {
            "id": str(uuid.uuid4()),
            "name": "bench.touch",
            "args": [0, 0.0],
            "kwargs": {},
            "options": {"queue": queue},
            "state": State.QUEUED,
            "attempts": 0,
            "max_attempts": 1,
        }
        for _ in range(count)
    ]
    with engine.begin() as connection:
        connection.execute(insert(Job), rows)
    started = time.perf_counter()
    while outbox.relay_once():
        pass
    seconds = time.perf_counter() - started
    with engine.begin() as connection:
        connection.execute(delete(Job).where(Job.id.in_([r["id"] for r in rows])))
    with celery_app.connection_for_write() as connection:
        Queue(queue, channel=connection.default_channel).delete()
    outbox.engine.dispose()
    engine.dispose()
    return count / seconds


def raw_broker(broker_url: str, count: int) -> tuple[float, float]:
    """Messages a second through kombu alone: (publish, consume)."""
    options = {"confirm_publish": True} if broker_url.startswith("amqp") else {}
    exchange = Exchange("bench-raw", type="direct")
    queue = Queue(f"bench-raw-{uuid.uuid4().hex[:8]}", exchange, routing_key="raw")
    body = {"args": [1, time.time()], "kwargs": {}}
    with Connection(broker_url, transport_options=options) as connection:
        producer = Producer(connection.default_channel, exchange=exchange, serializer="json")
        queue(connection.default_channel).declare()
        started = time.perf_counter()
        for _ in range(count):
            producer.publish(body, routing_key="raw")
        publish = count / (time.perf_counter() - started)
        received = 0

        def on_message(_: object, message: object) -> None:
            nonlocal received
            received += 1
            message.ack()  # type: ignore[attr-defined]

        started = time.perf_counter()
        with Consumer(
            connection.default_channel, [queue], callbacks=[on_message], accept=["json"]
        ) as consumer:
            consumer.qos(prefetch_count=100)
            while received < count:
                connection.drain_events(timeout=10)
        consume = count / (time.perf_counter() - started)
        queue(connection.default_channel).delete()
    return publish, consume


def table(results: list[Figures], pgbench: dict[str, float]) -> str:
    baseline = {f.stack: f for f in results if f.variant == "baseline"}
    lines = [
        "| stack | variant | enqueue/s | drain tasks/s (min–max) | × baseline | × pgbench "
        "| latency p50 / p99 ms | SQL statements / round trips per task (worker) "
        "| SQL per enqueue | CPU ms per task: worker / PostgreSQL / broker "
        "| connections at rest | RSS MiB after 1k → after N | counters correct |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in results:
        base = baseline.get(f.stack)
        ratio = f"{f.drain / base.drain:.2f}" if base and base is not f else "—"
        limit = f"{f.drain / pgbench[f.stack]:.2f}" if f.stack in pgbench else "—"
        rss = f"{f.rss_mb[0]:.0f} → {f.rss_mb[1]:.0f}" if f.rss_mb else "—"
        cpu = " / ".join(
            f"{statistics.median(f.cpu_ms[part]):.2f}" if f.cpu_ms.get(part) else "—"
            for part in ("worker", "postgres", "broker")
        )
        lines.append(
            f"| {f.stack} | {f.variant} | {statistics.median(f.enqueue_rates):.0f} "
            f"| {f.drain:.0f} ({min(f.drain_rates):.0f}–{max(f.drain_rates):.0f}) | {ratio} "
            f"| {limit} | {f.latency_p50:.1f} / {f.latency_p99:.1f} "
            f"| {f.statements:.1f} / {f.round_trips:.1f} | {f.enqueue_statements:.1f} | {cpu} "
            f"| {'—' if f.connections_at_rest is None else f.connections_at_rest} | {rss} "
            f"| {'yes' if f.correct else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--relay-jobs", type=int, default=5000)
    parser.add_argument("--rss-tasks", type=int, default=50_000, help="0 to skip")
    parser.add_argument("--stacks", default=",".join(stacks.STACKS))
    parser.add_argument(
        "--observed",
        action="store_true",
        help="also proj-full at INFO with JSON logs and traces on, and with them off",
    )
    options = parser.parse_args()
    results: list[Figures] = []
    limits: list[str] = []
    pgbench: dict[str, float] = {}
    for stack in options.stacks.split(","):
        problem = stacks.missing_services(stack)
        if problem:
            print(f"skipping {stack}: {problem}", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as name, stacks.stack(stack, Path(name)) as env:
            folder = Path(name)
            settings = load_settings(env)
            env = {
                **os.environ,
                **env,
                "PYTHONPATH": str(ROOT),
                "DATABASE_URL": settings.database_url,
                "PROJ_RECONCILE_INTERVAL": "5",
            }
            upgrade(settings.database_url)
            engine = create_engine(settings.database_url)
            workload.reset(engine)
            variants = ["proj-full"] if stack == "sqlite" else ["baseline", "proj", "proj-full"]
            if options.observed and stack != "sqlite":
                variants += OBSERVED
            for variant in variants:
                figures = measure(stack, variant, env, engine, options.tasks, options.runs, folder)
                print(f"{stack} {variant}: {figures.drain:.0f} tasks/s", file=sys.stderr)
                results.append(figures)
            if options.rss_tasks and stack != "sqlite":
                results[-1].rss_mb = rss_growth(env, engine, options.rss_tasks, folder)
                results[-1].correct &= workload.touches(engine) == expected(options.rss_tasks)
            if engine.dialect.name == "postgresql":
                pgbench[stack] = pgbench_tps(settings.database_url, folder)
            relay = relay_rate(env, options.relay_jobs)
            broker = settings.celery_connection()["broker_url"]
            raw = raw_broker(broker, options.relay_jobs) if stack != "sqlite" else None
            tps = f"{pgbench[stack]:.0f}" if stack in pgbench else "—"
            kombu = f"{raw[0]:.0f} | {raw[1]:.0f} | {relay / raw[0]:.2f}" if raw else "— | — | —"
            limits.append(f"| {stack} | {tps} | {relay:.0f} | {kombu} |")
            engine.dispose()
    report = (
        f"# Benchmark {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`python -m bench.run --tasks {options.tasks} --runs {options.runs} "
        f"--rss-tasks {options.rss_tasks} --stacks {options.stacks}"
        f"{' --observed' if options.observed else ''}`; worker "
        "`celery worker -P prefork -c 2`; drain is "
        f"the median of {options.runs} runs, first start to last commit; latency is enqueue "
        "to start, 200 tasks 20 ms apart"
        + (
            "; RSS is the proj-full worker's (main process and children) after 1,000 tasks "
            f"and after {options.rss_tasks:,}"
            if options.rss_tasks
            else ""
        )
        + ".\n\n"
        f"{table(results, pgbench)}\n\n"
        "| stack | pgbench tps (same transaction, 2 clients) | relay jobs/s (fast path off) "
        "| raw kombu publish/s | raw kombu consume/s | relay × raw publish |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(limits) + "\n"
    )
    out = ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y%m%d-%H%M}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
