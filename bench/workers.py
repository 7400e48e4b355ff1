"""The processes a benchmark round starts and watches: a ``celery worker -P
prefork -c 2`` for a variant (and beat beside proj-full's), the environment
each variant runs with, and the CPU and memory they use."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
from celery import Celery

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
PROJ_VARIANTS = ("proj", "proj-results", "proj-full", *OBSERVED)
APP = {"baseline": ["-A", "bench.baseline"], **{v: ["-A", "proj"] for v in PROJ_VARIANTS}}
INCLUDE = {"baseline": [], **{v: ["--include", "bench.proj_touch"] for v in PROJ_VARIANTS}}
SERVER_PROCESSES = {"postgres": "postgres", "beam.smp": "broker", "redis-server": "broker"}
"""What each server process's CPU is counted as (RabbitMQ runs as ``beam.smp``)."""


@contextmanager
def process(
    command: list[str],
    env: dict[str, str],
    log: Path,
    wake: Callable[[], object] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` running (its output in ``log``), stopped with SIGTERM after
    (and ``wake`` called until it has stopped, for up to 10 seconds)."""
    with log.open("wb") as out:
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        yield child
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            for _ in range(10):
                if wake is None or child.poll() is not None:
                    break
                with suppress(Exception):  # then it stops at its own pace
                    wake()
                with suppress(subprocess.TimeoutExpired):
                    child.wait(1)
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()


def waker(env: dict[str, str]) -> Callable[[], object] | None:
    """Something that makes a worker told to stop notice it at once. Its
    event loop notices at its next event or timer, which can be 10 seconds
    away; a control message (a ping nobody answers) is an event. None on the
    embedded broker, whose worker polls."""
    broker_url = env.get("CELERY_BROKER_URL", "")
    if not broker_url.startswith(("amqp:", "redis:")):
        return None

    def wake() -> None:
        with Celery(broker=broker_url, set_as_current=False) as app:
            app.control.broadcast("ping", reply=False)

    return wake


@contextmanager
def worker(variant: str, env: dict[str, str], folder: Path) -> Iterator[int]:
    """A worker for ``variant`` (and beat, for proj-full), from the moment it
    is ready (it starts consuming then: the CPU it has used so far is its
    start's); its pid."""
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
        main = running.enter_context(
            process(command, env, folder / f"{variant}.log", wake=waker(env))
        )
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
