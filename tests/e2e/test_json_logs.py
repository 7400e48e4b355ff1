"""``PROJ_LOG_FORMAT=json`` with the real commands: every line the worker
(its main process and prefork children), ``proj relay``, beat and the web
write is one JSON object, and a job's lines, Celery's own among them, name
the job; a line logged in its run carries the tenant and the trace it was
enqueued in.

What Celery and Flask print outside logging is the exception, named here:
the worker's shutdown announcement (Celery writes it to the raw stdout from
its signal handler) and ``flask run``'s two banner lines. Beat's banner is
left out with ``celery --quiet beat``, as ``proj run`` starts it.
"""

from __future__ import annotations

import json
import random
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from opentelemetry import context as otel_context
from opentelemetry import trace
from subprocesses import Command, Commands

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import Jobs, context
from proj.models import MAX_ID
from proj.tasks import send_welcome

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

PRINTED = {
    "worker": {"worker: Warm shutdown (MainProcess)"},
    "web": {" * Serving Flask app 'proj.web'", " * Debug mode: off"},
}
"""Lines Celery and Flask print themselves, outside logging."""


def json_lines(command: Command) -> list[dict[str, Any]]:
    """Every line ``command`` wrote, each parsed as one JSON object with the
    four fields every line has (the ones in :data:`PRINTED` left out)."""
    found = []
    output = command.output()
    for line in output.splitlines():
        if not line.strip() or line in PRINTED.get(command.name, set()):
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            raise AssertionError(
                f"{command.name} wrote a line that is not JSON: {line!r}; all it wrote:\n{output}"
            ) from None
        assert isinstance(parsed, dict), line
        assert {"time", "level", "logger", "message"} <= set(parsed), line
        assert datetime.fromisoformat(parsed["time"]).utcoffset() == timedelta(0), line
        found.append(parsed)
    return found


@pytest.fixture
def json_env(stack: Stack) -> dict[str, str]:
    return stack.process_env(PROJ_LOG_FORMAT="json", PROJ_RELAY_IN_WORKER="0")


@pytest.fixture
def through_the_relay(celery_app: Celery) -> Iterator[None]:
    """Jobs enqueued in this process wait for the relay (no fast path)."""
    jobs = Jobs.of(celery_app)
    settings = jobs.settings
    jobs.settings = replace(settings, outbox_fast_path=False)
    try:
        yield
    finally:
        jobs.settings = settings


def enqueue_in_a_trace(trace_id: int) -> str:
    """A welcome for a user that does not exist (its run logs that), enqueued
    for tenant ``acme`` in a span of trace ``trace_id``; its job id."""
    span = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=trace_id,
            span_id=random.getrandbits(63) + 1,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    )
    attached = otel_context.attach(trace.set_span_in_context(span))
    try:
        with context.tenant("acme"), session_scope() as session:
            return str(send_welcome.apply_async_on_commit((MAX_ID,), session=session))
    finally:
        otel_context.detach(attached)


def test_a_jobs_lines_from_the_relay_and_the_worker(
    celery_app: Celery, commands: Commands, json_env: dict[str, str], through_the_relay: None
) -> None:
    """A job the relay publishes: the worker's main process logs it received,
    its child logs the run's warning (with the job's task, attempt, queue,
    tenant and trace) and Celery's "succeeded", all naming the job; every
    line of both commands, to their last, is JSON."""
    celery_app.control.purge()
    worker = commands.worker(json_env)
    relay = commands.relay(json_env)
    trace_id = random.getrandbits(127) + 1

    job_id = enqueue_in_a_trace(trace_id)

    proj.jobs.testing.wait_for_state(job_id, "succeeded", timeout=60, celery_app=celery_app)
    worker.wait_for_output(f"send_welcome[{job_id}] succeeded")
    assert relay.stop() == 0
    assert worker.stop() == 0

    relayed = json_lines(relay)
    assert re.fullmatch(
        r"proj relay: stopped after publishing [1-9]\d* jobs", relayed[-1]["message"]
    )
    lines = json_lines(worker)
    assert any(line["message"].endswith(" ready.") for line in lines)
    mine = [line for line in lines if line.get("job_id") == job_id]
    by_message = {line["message"]: line for line in mine}
    received = by_message[f"Task proj.tasks.send_welcome[{job_id}] received"]
    assert received["logger"] == "celery.worker.strategy"
    [succeeded] = [line for line in mine if " succeeded in " in line["message"]]
    assert succeeded["logger"] == "celery.app.trace"
    assert succeeded["task"] == "proj.tasks.send_welcome" and succeeded["attempt"] == 1
    # Celery's lines come outside the run: a trace id only where a span is
    # current there (the Celery instrumentation's), and then the job's.
    assert succeeded.get("trace_id", f"{trace_id:032x}") == f"{trace_id:032x}"
    warned = by_message[f"send_welcome: no user with id {MAX_ID}; nothing sent"]
    expected = {
        "level": "WARNING",
        "logger": "proj.tasks",
        "task": "proj.tasks.send_welcome",
        "attempt": 1,
        "queue": "celery",
        "tenant": "acme",
        "trace_id": f"{trace_id:032x}",
    }
    assert {key: warned.get(key) for key in expected} == expected
    assert re.fullmatch(r"[0-9a-f]{16}", warned["span_id"])


def test_beat_writes_json(commands: Commands, json_env: dict[str, str], tmp_path: Path) -> None:
    """``celery --quiet beat`` at ``--loglevel=INFO``: its start and the
    scheduler's "Sending due task" lines, and everything else, are JSON."""
    env = {**json_env, "PROJ_CLEANUP_INTERVAL": "1"}
    beat = commands.celery(
        "beat", "--quiet", "beat", "--loglevel=INFO", f"--schedule={tmp_path / 's'}", env=env
    )
    beat.wait_for_output("Sending due task cleanup-expired", count=2)
    beat.stop()
    lines = json_lines(beat)
    sent = [line for line in lines if line["message"].startswith("Scheduler: Sending due task")]
    assert len(sent) >= 2 and all(line["logger"] == "celery.beat" for line in sent)
    assert any(line["message"] == "beat: Starting..." for line in lines)


def test_the_web_writes_json_and_echoes_request_ids(
    commands: Commands, json_env: dict[str, str]
) -> None:
    """``flask run``: werkzeug's start and request lines are JSON, and the
    response echoes the request's ``X-Request-ID``."""
    web, url = commands.web(json_env)
    request = urllib.request.Request(f"{url}/", headers={"X-Request-ID": "e2e-42"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        assert response.headers["X-Request-ID"] == "e2e-42"
    web.wait_for_output("GET / HTTP/1.1")
    web.stop()
    lines = json_lines(web)
    [served] = [line for line in lines if "GET / HTTP/1.1" in line["message"]]
    assert served["logger"] == "werkzeug" and served["level"] == "INFO"
    assert any("Running on" in line["message"] for line in lines)
