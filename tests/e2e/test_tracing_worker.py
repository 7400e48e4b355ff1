"""Traces across the real processes, each exporting to its output
(``OTEL_TRACES_EXPORTER=console``): a request's trace goes on through the
enqueue, the publish (the web's fast path, or ``proj relay`` later) and the
run in a prefork child; a job enqueued by a process that does not trace still
runs in its enqueuer's trace; a child recycled after every task loses none of
its spans."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from subprocesses import WORKER_OPTIONS, Command, Commands, api_token, e2e_env

from proj.db import session_scope
from proj.tasks import send_welcome

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

WELCOME = "proj.tasks.send_welcome"
CONSOLE = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
"""Spans to each process's output, exported every 0.1 s."""


def exported(*commands: Command) -> list[dict[str, Any]]:
    """The spans the commands have printed (the console exporter's JSON)."""
    found = []
    for command in dict.fromkeys(commands):
        block: list[str] | None = None
        for line in command.output().splitlines():
            if line == "{":
                block = [line]
            elif block is not None:
                block.append(line)
                if line == "}":
                    with contextlib.suppress(ValueError):  # two processes' lines mixed
                        found.append(json.loads("\n".join(block)))
                    block = None
    return found


def spans_named(spans: list[dict[str, Any]], name: str, trace_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name and s["context"]["trace_id"] == f"0x{trace_id}"]


def caller() -> tuple[str, str]:
    """A caller's trace id and span id (hex)."""
    return f"{random.getrandbits(128) | 1:032x}", f"{random.getrandbits(64) | 1:016x}"


def sign_up(base_url: str, token: str, traceparent: str) -> None:
    request = urllib.request.Request(
        f"{base_url}/api/users",
        data=json.dumps({"email": f"traced-{uuid.uuid4().hex}@example.com"}).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token}",
            "traceparent": traceparent,
        },
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        assert response.status == 201


@pytest.fixture
def purged(celery_app: Celery) -> Iterator[Celery]:
    celery_app.control.purge()
    yield celery_app


@pytest.mark.parametrize("publisher", ["fast-path", "proj-relay"])
def test_a_request_and_the_run_it_causes_are_one_trace(
    stack: Stack, purged: Celery, commands: Commands, publisher: str
) -> None:
    """``POST /api/users`` with a ``traceparent``: the web's request span
    continues it, the create span is its child, the publish span (the web's
    fast path, or ``proj relay`` publishing later from its own process) is the
    create span's, and the worker child's run span is the publish span's."""
    relayed = publisher == "proj-relay"
    extra = {"PROJ_OUTBOX_FAST_PATH": "0", "PROJ_RELAY_IN_WORKER": "0"} if relayed else {}
    env = stack.process_env(**CONSOLE, **extra)
    worker = commands.worker(env)
    web, base_url = commands.web(env)
    trace_id, span_id = caller()
    sign_up(base_url, api_token(env), f"00-{trace_id}-{span_id}-01")
    relay = commands.relay(env) if relayed else web
    run = worker.until(lambda: spans_named(exported(worker), f"run/{WELCOME}", trace_id))
    [create] = web.until(lambda: spans_named(exported(web), f"create {WELCOME}", trace_id))
    [request] = web.until(lambda: [s for s in exported(web) if s["parent_id"] == f"0x{span_id}"])
    assert request["kind"] == "SpanKind.SERVER"
    assert request["context"]["trace_id"] == f"0x{trace_id}"
    assert create["parent_id"] == request["context"]["span_id"]
    [publish] = relay.until(
        lambda: spans_named(exported(relay), f"apply_async/{WELCOME}", trace_id)
    )
    assert publish["parent_id"] == create["context"]["span_id"]
    assert [s["parent_id"] for s in run] == [publish["context"]["span_id"]]
    job_id = create["attributes"]["messaging.message.id"]
    assert run[0]["attributes"]["messaging.message.id"] == job_id
    if relayed:
        # The batch span ends after its publishes: it may be exported later.
        [batch] = relay.until(lambda: [s for s in exported(relay) if s["name"] == "send"])
        assert [link["context"]["span_id"] for link in batch["links"]] == [
            create["context"]["span_id"]
        ]


def test_an_untraced_enqueuer_hands_its_trace_to_the_run(
    stack: Stack, purged: Celery, commands: Commands
) -> None:
    """This test's process does not trace; a job it enqueues inside a span
    (published by its fast path, uninstrumented) runs in that span's trace,
    as its child, in a traced worker."""
    worker = commands.worker(stack.process_env(**CONSOLE))
    trace_id, span_id = caller()
    enqueuer = SpanContext(int(trace_id, 16), int(span_id, 16), False, TraceFlags(1))
    with trace.use_span(NonRecordingSpan(enqueuer)), session_scope() as session:
        job_id = send_welcome.apply_async_on_commit((0,), session=session)
    [run] = worker.until(lambda: spans_named(exported(worker), f"run/{WELCOME}", trace_id))
    assert run["parent_id"] == f"0x{span_id}"
    assert run["attributes"]["messaging.message.id"] == job_id


JOBS = 100


class Collector:
    """An OTLP/HTTP endpoint of the test's own: the bodies it was sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, text: str) -> bool:
        return any(text.encode() in body for body in list(self.bodies))


RECYCLED_EXPORTER = {"pg-rabbit": "console", "pg-redis": "otlp"}
"""The exporter each stack's recycled children use: each exporter on one
broker (both on every stack took a minute and a half more). A child's flush
as it exits does not depend on the stack; on the embedded one, where a child
forks through SQLite's fork gate, the test took 40 s for nothing more."""


def test_children_recycled_after_every_task_lose_no_span(
    stack: Stack, purged: Celery, commands: Commands
) -> None:
    """With ``--max-tasks-per-child=1`` (a child exits after each task, without
    ``atexit``) and spans batched every 5 s, each child flushes as it exits:
    the run span of every job is exported, to the output or over OTLP."""
    if stack.name not in RECYCLED_EXPORTER:
        pytest.skip("the PostgreSQL stacks cover both exporters")
    exporter = RECYCLED_EXPORTER[stack.name]
    collector = Collector()
    env = e2e_env(
        stack.process_env(OTEL_TRACES_EXPORTER=exporter, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url)
    )
    worker = commands.celery(
        "worker",
        "worker",
        *WORKER_OPTIONS,
        "--max-tasks-per-child=1",
        *("-n", f"e2e-{uuid.uuid4().hex[:8]}@%h"),
        env=env,
    )
    worker.wait_for_output("ready.")
    trace_id, span_id = caller()
    enqueuer = SpanContext(int(trace_id, 16), int(span_id, 16), False, TraceFlags(1))
    with trace.use_span(NonRecordingSpan(enqueuer)), session_scope() as session:
        job_ids = {send_welcome.apply_async_on_commit((0,), session=session) for _ in range(JOBS)}

    def run_ids() -> set[str]:
        if exporter == "otlp":
            return {job_id for job_id in job_ids if collector.received(job_id)}
        runs = spans_named(exported(worker), f"run/{WELCOME}", trace_id)
        return {run["attributes"]["messaging.message.id"] for run in runs}

    try:
        worker.until(lambda: run_ids() >= job_ids, timeout=120)
    finally:
        collector.server.shutdown()
        collector.server.server_close()
    assert run_ids() == job_ids
    if exporter == "otlp":
        assert any(bytes.fromhex(trace_id) in body for body in collector.bodies)
