"""Run the benchmark: ``python -m bench.run`` (from the repository root).

For each stack (PostgreSQL + RabbitMQ, PostgreSQL + Redis, embedded SQLite)
and each variant (plain Celery baseline, proj), a ``celery worker -P prefork
-c 2`` subprocess drains the workload. Figures are ratios against the baseline
measured in the same run; every run also checks that each user's counter
equals the tasks sent to it. Writes a Markdown table to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, text

from bench import workload
from proj import scratch
from proj.migrations import upgrade

ROOT = Path(__file__).resolve().parents[1]
WORKER = {
    "baseline": ["-A", "bench.baseline", "worker"],
    "proj": ["-A", "proj", "worker", "--include", "bench.proj_touch"],
}


@dataclass
class Figures:
    stack: str
    variant: str
    enqueue_rates: list[float] = field(default_factory=list)
    drain_rates: list[float] = field(default_factory=list)
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    connections_at_rest: int | None = None
    correct: bool = True

    @property
    def drain(self) -> float:
        return statistics.median(self.drain_rates)


@contextmanager
def worker(variant: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    ready = log.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    env = {**env, "BENCH_READY_FILE": str(ready)}
    command = [
        sys.executable,
        "-m",
        "celery",
        *WORKER[variant],
        "-P",
        "prefork",
        "-c",
        "2",
        "--without-heartbeat",
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        "WARNING",
        "-n",
        f"bench-{variant}-{os.getpid()}@%h",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{variant} worker did not start:\n{log.read_text()}")
            time.sleep(0.1)
        time.sleep(1)  # let the pool's children finish starting
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def enqueue(variant: str, count: int, env: dict[str, str], interval: float = 0.0) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "bench.enqueue", variant, str(count), str(interval)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return float(report["count"] / report["seconds"])


def wait_drained(engine: Engine, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while sum(workload.touches(engine).values()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(workload.touches(engine).values())} of {count} ran")
        time.sleep(0.2)


def expected(count: int) -> dict[int, int]:
    base, extra = divmod(count, workload.USERS)
    return {u: base + (1 if u <= extra else 0) for u in range(1, workload.USERS + 1)}


def worker_connections(engine: Engine) -> int | None:
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
    stack: str, variant: str, env: dict[str, str], engine: Engine, tasks: int, runs: int, log: Path
) -> Figures:
    figures = Figures(stack, variant)
    with worker(variant, env, log):
        for _ in range(runs):
            workload.clear(engine)
            figures.enqueue_rates.append(enqueue(variant, tasks, env))
            wait_drained(engine, tasks)
            figures.drain_rates.append(tasks / workload.drain_seconds(engine))
            figures.correct &= workload.touches(engine) == expected(tasks)
        workload.clear(engine)
        enqueue(variant, 200, env, interval=0.02)
        wait_drained(engine, 200)
        lat = workload.latencies(engine)
        figures.latency_p50 = statistics.median(lat)
        figures.latency_p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        figures.correct &= workload.touches(engine) == expected(200)
        time.sleep(1)
        figures.connections_at_rest = worker_connections(engine)
    return figures


def table(results: list[Figures]) -> str:
    baseline = {f.stack: f for f in results if f.variant == "baseline"}
    lines = [
        "| stack | variant | enqueue/s | drain tasks/s (min–max) | × baseline drain "
        "| latency p50 / p99 ms | connections at rest | counters correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in results:
        base = baseline.get(f.stack)
        ratio = f"{f.drain / base.drain:.2f}" if base and base is not f else "—"
        lines.append(
            f"| {f.stack} | {f.variant} | {statistics.median(f.enqueue_rates):.0f} "
            f"| {f.drain:.0f} ({min(f.drain_rates):.0f}–{max(f.drain_rates):.0f}) | {ratio} "
            f"| {f.latency_p50:.1f} / {f.latency_p99:.1f} "
            f"| {'—' if f.connections_at_rest is None else f.connections_at_rest} "
            f"| {'yes' if f.correct else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stacks", default=",".join(scratch.STACKS))
    options = parser.parse_args()
    results: list[Figures] = []
    for stack in options.stacks.split(","):
        problem = scratch.missing_services(stack)
        if problem:
            print(f"skipping {stack}: {problem}", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as folder, scratch.stack(stack, Path(folder)) as env:
            env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
            database_url = env.get("DATABASE_URL", f"sqlite:///{folder}/proj.sqlite3")
            env["DATABASE_URL"] = database_url
            upgrade(database_url)
            engine = create_engine(database_url)
            workload.reset(engine)
            variants = ["proj"] if stack == "sqlite" else ["baseline", "proj"]
            for variant in variants:
                log = Path(folder) / f"{variant}.log"
                figures = measure(stack, variant, env, engine, options.tasks, options.runs, log)
                print(f"{stack} {variant}: {figures.drain:.0f} tasks/s", file=sys.stderr)
                results.append(figures)
            engine.dispose()
    report = (
        f"# Benchmark {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"`python -m bench.run --tasks {options.tasks} --runs {options.runs}`; "
        f"worker `celery worker -P prefork -c 2`; drain is the median of {options.runs} runs.\n\n"
        f"{table(results)}\n"
    )
    out = ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y%m%d-%H%M}.md"
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
