"""Structured logs (``PROJ_LOG_FORMAT=json``, :mod:`proj.jobs.logs`) in one
process: a task run's lines carry its job, the tenant it was enqueued for and
the request it was enqueued in; a traceback stays inside its line; requests
take or get an id and echo it; Celery's ``setup_logging`` sets JSON up at the
worker's level; and text stays the default."""

from __future__ import annotations

import io
import json
import logging
import random
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from celery import Celery, signals
from flask import Flask
from flask.testing import FlaskClient
from opentelemetry import context as otel_context
from opentelemetry import trace

import proj.jobs.testing
import proj.tasks
from proj.db import session_scope
from proj.jobs import ConfigurationError, Jobs, JobsSettings, context, logs, shared_task

Lines = Callable[[], list[dict[str, Any]]]

noted = logging.getLogger("tests.logs")


@shared_task(name="tests.logs.note")
def note(text: str) -> None:
    """Log ``text``, then a caught error's traceback."""
    noted.warning("note: %s", text)
    try:
        raise RuntimeError(f"{text} went wrong\non two lines")
    except RuntimeError:
        noted.exception("note: %s failed", text)


@pytest.fixture
def worker(purged: Celery) -> Iterator[None]:
    with proj.jobs.testing.worker(purged):
        yield


@pytest.fixture
def json_lines(worker: None) -> Iterator[Lines]:
    """The JSON lines written from now on (the worker, started first, clears
    the root logger's handlers as it starts)."""
    stream = io.StringIO()
    handler = logs.json_handler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines_of(lines: Lines, job_id: str) -> list[dict[str, Any]]:
    return [line for line in lines() if line.get("job_id") == job_id]


def test_a_runs_lines_carry_its_job_and_tenant(purged: Celery, json_lines: Lines) -> None:
    """A line logged in a run names the job, its task, attempt and queue, the
    tenant it was enqueued for and the current span; ``time`` is ISO 8601 in
    UTC; a traceback is the ``exc_info`` string of its one line."""
    trace_id, span_id = random.getrandbits(127) + 1, random.getrandbits(63) + 1
    span = trace.NonRecordingSpan(
        trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    attached = otel_context.attach(trace.set_span_in_context(span))
    try:
        with context.tenant("acme"), session_scope() as session:
            job_id = note.apply_async_on_commit(("hello",), session=session)
    finally:
        otel_context.detach(attached)
    proj.jobs.testing.wait_for_state(job_id, "succeeded", celery_app=purged)

    proj.jobs.testing.wait_for(lambda: len(lines_of(json_lines, job_id)) >= 2)
    said, failed = lines_of(json_lines, job_id)[:2]
    assert said["message"] == "note: hello"
    expected = {"job_id": job_id, "task": "tests.logs.note", "attempt": 1, "queue": "celery"}
    assert {k: said[k] for k in expected} == expected
    assert said["tenant"] == "acme"
    # The enqueuer's span, or with tracing on a span of the run in its trace.
    assert said["trace_id"] == f"{trace_id:032x}"
    assert len(said["span_id"]) == 16 and int(said["span_id"], 16) > 0
    assert said["level"] == "WARNING" and said["logger"] == "tests.logs"
    assert "request_id" not in said and "exc_info" not in said
    assert datetime.fromisoformat(said["time"]).utcoffset() == timedelta(0)
    assert list(said)[:4] == ["time", "level", "logger", "message"]

    assert failed["message"] == "note: hello failed"
    assert failed["exc_info"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: hello went wrong\non two lines" in failed["exc_info"]
    assert failed["tenant"] == "acme" and failed["job_id"] == job_id


def test_a_jobs_lines_carry_the_request_it_was_enqueued_in(
    client: FlaskClient, json_lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST /api/users`` with ``X-Request-ID``: the response echoes the id,
    and the welcome job's run logs with it."""
    email = f"logs-{uuid.uuid4().hex[:10]}@example.com"
    monkeypatch.setattr(proj.tasks, "send_mail", lambda **mail: noted.warning("to %s", mail["to"]))

    response = client.post("/api/users", json={"email": email}, headers={"X-Request-ID": "r-1.a_B"})

    assert response.status_code == 201, response.get_json()
    assert response.headers["X-Request-ID"] == "r-1.a_B"
    [line] = proj.jobs.testing.wait_for(
        lambda: [line for line in json_lines() if line["message"] == f"to {email}"]
    )
    assert line["request_id"] == "r-1.a_B"
    assert line["task"] == "proj.tasks.send_welcome"
    assert proj.jobs.testing.job(line["job_id"]).context["request_id"] == "r-1.a_B"
    assert context.request_id_var.get() is None, "the request's id outlived it"


@pytest.mark.parametrize(
    "given",
    [None, "", "x" * 129, "has space", "a/b", "ünïcode"],
    ids=["none", "empty", "too-long", "space", "slash", "unicode"],
)
def test_a_request_without_a_valid_id_gets_a_new_one(
    client: FlaskClient, given: str | None
) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    first, second = (client.get("/", headers=headers) for _ in range(2))
    made = [response.headers["X-Request-ID"] for response in (first, second)]
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in made), made
    assert made[0] != made[1]


def test_a_request_id_of_128_characters_is_kept(client: FlaskClient) -> None:
    given = "A-z_0.9" * 18 + "ab"
    assert len(given) == 128
    assert client.get("/", headers={"X-Request-ID": given}).headers["X-Request-ID"] == given


@pytest.fixture
def root_logger_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The root logger, stdout and stderr as they were, and logs' signal
    receivers gone, once the test ends."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in ("CELERY_LOG_REDIRECT", "CELERY_LOG_REDIRECT_LEVEL"):
        monkeypatch.delenv(name, raising=False)  # the redirect sets them
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    try:
        yield
    finally:
        for signal in (signals.setup_logging, signals.celeryd_init, signals.celeryd_after_setup):
            signal.disconnect(dispatch_uid=logs.HANDLER_NAME)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_json_worker_sets_json_up_once_at_its_level(
    celery_app: Celery, root_logger_restored: None
) -> None:
    """With ``json``, a worker's ``celeryd_init`` and Celery's ``setup_logging``
    (sent with ``--loglevel``) leave the root logger's one JSON handler in
    place at that level (a Flask app made later keeps it), tell the worker to
    leave its banner out, and send what tasks print to the log."""
    settings = replace(Jobs.of(celery_app).settings, log_format="json")
    logs.install(cast(Jobs, SimpleNamespace(settings=settings)))
    stream = io.StringIO()
    logs.write_json(stream=stream)  # as a Flask app made at import would, first
    root = logging.getLogger()
    [handler] = root.handlers

    worker = SimpleNamespace(
        quiet=False, redirect_stdouts=True, redirect_stdouts_level="WARNING", app=celery_app
    )
    signals.celeryd_init.send(sender="w@h", instance=worker, conf=None, options={})
    for _ in range(2):
        signals.setup_logging.send(sender=None, loglevel=logging.WARNING, logfile=None)
    assert logs.start(settings)  # as a Flask app made later would
    assert root.handlers == [handler]
    assert root.level == logging.WARNING
    assert worker.quiet is True
    signals.celeryd_after_setup.send(sender="w@h", instance=worker, conf=celery_app.conf)
    print("printed by a task")
    noted.info("below the level")

    [line] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert line["message"] == "printed by a task"
    assert (line["logger"], line["level"]) == ("celery.redirected", "WARNING")


def test_text_is_the_default_and_changes_nothing(app: Flask) -> None:
    assert JobsSettings.from_environ({"DATABASE_URL": "sqlite://"}).log_format == "text"
    environ = {"DATABASE_URL": "sqlite://", "PROJ_LOG_FORMAT": "JSON"}
    assert JobsSettings.from_environ(environ).log_format == "json"
    with pytest.raises(ConfigurationError, match="PROJ_LOG_FORMAT='xml': expected json or text"):
        JobsSettings.from_environ({**environ, "PROJ_LOG_FORMAT": "xml"})

    root = logging.getLogger()
    before = list(root.handlers)
    assert app.test_client().get("/").status_code == 200
    assert root.handlers == before
    assert not logs.writes_json()
    assert not signals.setup_logging.receivers
