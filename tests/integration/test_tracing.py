"""Traces on real databases and brokers: a request with an incoming
``traceparent``, the job it enqueues and that job's run are one trace, whether
the fast path publishes the job or the relay does, later, from a thread with
no span current, after a publish that failed; the run's SQL is under the run
span; every span started is ended.

Tracing is turned on for each test with an in-memory exporter
(``tracing.enable(provider)``: proj's and its instrumentations' spans go to
that provider, which is never made global) and off again after it, so the
other tests run untraced.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from kombu import Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import select, update

import proj.jobs.testing
from proj.jobs import ConfigurationError, Jobs, outbox, tracing
from proj.jobs.clock import utcnow
from proj.jobs.models import Job
from proj.jobs.relay import make_relay

if TYPE_CHECKING:
    from conftest import Stack

WELCOME = "proj.tasks.send_welcome"


class Counting(SpanProcessor):
    """The spans started and the spans ended, by span id."""

    def __init__(self) -> None:
        self.started: dict[int, str] = {}
        self.ended: set[int] = set()
        self.lock = threading.Lock()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        with self.lock:
            self.started[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        with self.lock:
            self.ended.add(span.context.span_id)

    def open(self) -> list[str]:
        """The names of the spans started and not ended."""
        with self.lock:
            return sorted(name for sid, name in self.started.items() if sid not in self.ended)


class Recorded:
    """What a traced test recorded."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.counting = Counting()

    def spans(self, trace_id: int | None = None) -> list[ReadableSpan]:
        found = self.exporter.get_finished_spans()
        return [s for s in found if trace_id is None or s.context.trace_id == trace_id]

    def named(self, name: str, trace_id: int | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans(trace_id) if s.name == name]

    def one(self, name: str, trace_id: int | None = None) -> ReadableSpan:
        found = self.named(name, trace_id)
        assert len(found) == 1, f"{len(found)} spans {name!r}: {self.summary()}"
        return found[0]

    def wait_for(self, name: str, trace_id: int) -> ReadableSpan:
        proj.jobs.testing.wait_for(lambda: self.named(name, trace_id))
        return self.one(name, trace_id)

    def descends(self, span: ReadableSpan, ancestor: ReadableSpan) -> bool:
        """Whether ``span`` is below ``ancestor`` (through recorded spans)."""
        by_id = {s.context.span_id: s for s in self.spans()}
        parent = span.parent
        while parent is not None:
            if parent.span_id == ancestor.context.span_id:
                return True
            above = by_id.get(parent.span_id)
            parent = above.parent if above is not None else None
        return False

    def summary(self) -> list[tuple[str, str, str | None]]:
        return [
            (
                s.name,
                f"{s.context.span_id:016x}",
                f"{s.parent.span_id:016x}" if s.parent else None,
            )
            for s in self.spans()
        ]


@pytest.fixture
def spans() -> Iterator[Recorded]:
    """Tracing on for this test, to an in-memory exporter; off afterwards."""
    recorded = Recorded()
    provider = TracerProvider()
    provider.add_span_processor(recorded.counting)
    provider.add_span_processor(SimpleSpanProcessor(recorded.exporter))
    assert tracing.enable(provider) is provider
    try:
        yield recorded
    finally:
        tracing.disable()
        provider.shutdown()


@pytest.fixture
def app(spans: Recorded, app: Flask) -> Flask:
    """The Flask application, made once tracing is on (its requests are traced)."""
    return app


@pytest.fixture
def fast_path_off(celery_app: Celery) -> Iterator[None]:
    """Jobs committed from now on are left to the relay."""
    jobs = Jobs.of(celery_app)
    settings = jobs.settings
    jobs.settings = replace(settings, outbox_fast_path=False)
    yield
    jobs.settings = settings


def incoming() -> tuple[int, int, str]:
    """A caller's trace: its trace id, span id and ``traceparent``."""
    trace_id, span_id = random.getrandbits(128) | 1, random.getrandbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def sign_up(client: FlaskClient, traceparent: str) -> None:
    answer = client.post(
        "/api/users",
        json={"email": f"tracing-{uuid.uuid4().hex}@example.com"},
        headers={"traceparent": traceparent},
    )
    assert answer.status_code == 201, answer.get_json()


def relay_in_a_thread(stack: Stack, celery_app: Celery) -> int:
    """Publish the owed jobs with a relay of its own, from a new thread (no span current)."""
    relay = make_relay(celery_app, replace(stack.settings.jobs, relay_grace=0.0))
    published: list[int] = []
    current: list[bool] = []

    def publish() -> None:
        current.append(trace.get_current_span().get_span_context().is_valid)
        published.append(relay.relay_once())

    try:
        thread = threading.Thread(target=publish)
        thread.start()
        thread.join(60)
    finally:
        relay.engine.dispose()
    assert current == [False]
    return published[0]


def assert_one_trace(spans: Recorded, trace_id: int, caller_span: int) -> dict[str, ReadableSpan]:
    """Request → create → publish → run, parent to child, in ``trace_id``; the
    run's SQL under the run span; the only other SQL under the create span its insert."""
    request = next(s for s in spans.spans(trace_id) if s.kind == SpanKind.SERVER)
    assert request.parent is not None and request.parent.span_id == caller_span
    create = spans.one(f"create {WELCOME}", trace_id)
    run = spans.wait_for(f"run/{WELCOME}", trace_id)
    [publish] = [s for s in spans.named(f"apply_async/{WELCOME}", trace_id) if s.status.is_ok]
    assert create.parent is not None and create.parent.span_id == request.context.span_id
    assert publish.parent is not None and publish.parent.span_id == create.context.span_id
    assert run.parent is not None and run.parent.span_id == publish.context.span_id
    attributes = dict(create.attributes or {})
    assert attributes["messaging.system"] == "celery"
    assert attributes["messaging.operation.type"] == "create"
    assert attributes["messaging.destination.name"] == "celery"
    assert attributes["messaging.message.id"] == dict(run.attributes or {})["messaging.message.id"]
    sql = [s for s in spans.spans(trace_id) if "db.system" in (s.attributes or {})]
    in_run = [s for s in sql if spans.descends(s, run)]
    statements = " ".join(str((s.attributes or {}).get("db.statement")) for s in in_run)
    assert "welcomed_at" in statements and "running" in statements, statements
    beside_run = [s for s in sql if spans.descends(s, create) and not spans.descends(s, run)]
    under_create = [str((s.attributes or {}).get("db.statement")) for s in beside_run]
    assert len(under_create) == 1 and under_create[0].startswith("INSERT INTO jobs"), under_create
    return {"request": request, "create": create, "publish": publish, "run": run}


def test_fast_path_request_and_run_are_one_trace(
    spans: Recorded, client: FlaskClient, purged: Celery
) -> None:
    """A request with a ``traceparent`` continues it; the job it enqueues is
    published at once and runs in the same trace, its SQL under the run span."""
    trace_id, caller, traceparent = incoming()
    with proj.jobs.testing.worker(purged):
        sign_up(client, traceparent)
        found = assert_one_trace(spans, trace_id, caller)
    job_id = str(dict(found["create"].attributes or {})["messaging.message.id"])
    assert proj.jobs.testing.job(job_id).state == "succeeded"
    assert spans.counting.open() == []


def test_relay_publishes_into_the_request_trace(
    spans: Recorded, client: FlaskClient, stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """With the fast path off, the relay publishes the job later from a thread
    with no span current: its publish span is the create span's child (not its
    batch span's, which links to the job), and the run joins the request's trace."""
    with Jobs.of(purged).engine.begin() as connection:
        # Rows earlier tests left owed are not this test's to publish.
        connection.execute(
            update(Job).where(Job.published_at.is_(None)).values(published_at=utcnow())
        )
    trace_id, caller, traceparent = incoming()
    sign_up(client, traceparent)
    create = spans.one(f"create {WELCOME}", trace_id)
    job_id = dict(create.attributes or {})["messaging.message.id"]
    assert proj.jobs.testing.job(str(job_id)).published_at is None
    assert spans.named(f"apply_async/{WELCOME}") == []

    assert relay_in_a_thread(stack, purged) == 1
    batch = spans.one("send")
    assert batch.parent is None and batch.kind == SpanKind.CLIENT
    assert [link.context.span_id for link in batch.links] == [create.context.span_id]
    assert dict(batch.attributes or {})["messaging.operation.type"] == "send"
    with proj.jobs.testing.worker(purged):
        found = assert_one_trace(spans, trace_id, caller)
    assert not spans.descends(found["publish"], batch)
    assert spans.counting.open() == []


def test_a_failed_publish_leaves_no_span_open_and_the_relay_continues_the_trace(
    spans: Recorded,
    client: FlaskClient,
    stack: Stack,
    purged: Celery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker goes away as the fast path publishes: the publish span ends
    with the error (none is left open, nor current in the request), the request
    still answers, and the relay's publish, once the broker is back, continues
    the request's trace."""
    publish = Producer.publish
    failures: list[str] = []

    def broker_gone(self: Producer, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append("failed")
            raise OperationalError("the broker went away")
        return publish(self, *args, **kwargs)

    monkeypatch.setattr(Producer, "publish", broker_gone)
    trace_id, caller, traceparent = incoming()
    sign_up(client, traceparent)
    assert Jobs.of(purged).flush()
    assert failures == ["failed"]
    [failed] = spans.named(f"apply_async/{WELCOME}", trace_id)
    assert failed.status.status_code == StatusCode.ERROR
    assert spans.counting.open() == []
    request = next(s for s in spans.spans(trace_id) if s.kind == SpanKind.SERVER)
    assert spans.descends(failed, request)

    assert relay_in_a_thread(stack, purged) == 1
    with proj.jobs.testing.worker(purged):
        assert_one_trace(spans, trace_id, caller)
    assert spans.counting.open() == []


def test_relay_sending_a_task_unknown_here_leaves_no_span_open(
    spans: Recorded, stack: Stack, celery_app: Celery, fast_path_off: None
) -> None:
    """The relay publishes by name (``send_task``), tasks this process does not
    know included: their publish spans end too, under the job's create span."""
    queue = f"tests.tracing.{uuid.uuid4().hex}"
    jobs = Jobs.of(celery_app)
    with jobs.session_scope() as session:
        job_id = outbox.enqueue(
            session,
            jobs,
            "tests.tracing.nowhere",
            (),
            {},
            max_attempts=1,
            options={"queue": queue},
        )
    try:
        assert relay_in_a_thread(stack, celery_app) == 1
    finally:
        with celery_app.connection_for_write() as connection:
            Queue(queue, Exchange(queue), routing_key=queue)(connection.default_channel).delete()
    create = spans.one("create tests.tracing.nowhere")
    assert dict(create.attributes or {})["messaging.destination.name"] == queue
    assert dict(create.attributes or {})["messaging.message.id"] == job_id
    [published] = spans.named("apply_async/tests.tracing.nowhere")
    assert published.parent is not None
    assert published.parent.span_id == create.context.span_id
    assert spans.counting.open() == []


def test_after_disable_nothing_is_traced(stack: Stack, celery_app: Celery) -> None:
    """Once tracing is off again, an enqueue makes no span (nor does its SQL,
    on an engine traced before) and its row keeps no trace context; a publish
    makes no span either."""
    recorded = Recorded()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(recorded.exporter))
    jobs = Jobs.of(celery_app)
    tracing.enable(provider)
    with jobs.session_scope() as session:
        session.execute(select(1))
    assert recorded.spans() != []
    recorded.exporter.clear()
    tracing.disable()

    queue = f"tests.tracing.{uuid.uuid4().hex}"
    with jobs.session_scope() as session:
        job_id = outbox.enqueue(
            session, jobs, "tests.tracing.nowhere", (), {}, max_attempts=1, options={}
        )
        kept = session.scalar(select(Job.context).where(Job.id == job_id))
        session.rollback()
    try:
        celery_app.send_task("tests.tracing.nowhere", queue=queue, ignore_result=True)
    finally:
        with celery_app.connection_for_write() as connection:
            Queue(queue, Exchange(queue), routing_key=queue)(connection.default_channel).delete()
    assert kept is not None and "traceparent" not in kept
    assert recorded.spans() == []


@pytest.mark.parametrize(
    ("value", "names"),
    [("", ()), ("none", ()), ("console", ("console",)), (" OTLP , console", ("otlp", "console"))],
)
def test_exporters_named_by_the_environment(value: str, names: tuple[str, ...]) -> None:
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": value}) == names


def test_an_exporter_proj_does_not_make_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="console or otlp"):
        tracing.exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})
