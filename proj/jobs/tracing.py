"""Traces of jobs (OpenTelemetry): one trace from the request that enqueues a
job to the SQL its run sends, through the relay however much later it publishes.

Tracing is on when ``OTEL_TRACES_EXPORTER`` is ``console`` or ``otlp`` (or
both, comma-separated; OTLP over HTTP, configured by the SDK's own
``OTEL_EXPORTER_OTLP_*`` variables), and off when it is unset or ``none``:
nothing is then installed. The service is ``OTEL_SERVICE_NAME`` (default
``proj``). A process turns tracing on once, when it first needs it: a worker
as it starts (its prefork children inherit it, with exporters made again after
the fork, and flush as they exit), a Flask app at ``init_app``, any other
process (``proj relay``, a script) at its first enqueue or publish. A tracer
provider the application configured first is used as it is.

What is traced:

- a Flask app's requests (the Flask instrumentation; an incoming
  ``traceparent`` is continued) and the SQL of its Flask-SQLAlchemy engines;
- each enqueue: a ``create <task>`` span around the ledger insert, inside
  which the job's context is captured, so the row keeps it;
- each publish, fast path, relay or retry alike: the Celery instrumentation's
  ``apply_async/<task>`` span, a child of the job's ``create`` span (the
  stored context is attached around it), and never left open when the
  publish fails; the relay's batches are ``send`` spans linking to each job;
- each run: the Celery instrumentation's ``run/<task>`` span (the message
  carries the publish span's ``traceparent``) and, under it, the SQL of the
  worker tier's engine. The relay's polls and the heartbeats are not traced
  (a trace a second, telling nothing).

proj depends on OpenTelemetry's API only, whose calls do nothing without an
SDK. Tracing needs the ``otel`` extra (``pip install 'proj[otel]'``: the SDK,
its OTLP exporter and the Celery, Flask and SQLAlchemy instrumentations);
without it proj runs untraced, and asking for tracing all the same
(``OTEL_TRACES_EXPORTER``, :func:`enable`) raises :class:`ConfigurationError`
naming what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import signals
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind
from opentelemetry.util.types import AttributeValue
from sqlalchemy import Connection, Engine, event

from proj.jobs.context import TRACE_FIELDS
from proj.jobs.errors import ConfigurationError

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from proj.jobs.extension import Jobs

EXPORTERS = ("console", "otlp")
"""The values of ``OTEL_TRACES_EXPORTER`` that turn tracing on."""
DEFAULT_SERVICE_NAME = "proj"
"""``service.name`` unless ``OTEL_SERVICE_NAME`` (or ``OTEL_RESOURCE_ATTRIBUTES``) names one."""
MESSAGING_SYSTEM = "celery"
"""``messaging.system`` of proj's own spans."""
STANDING_JOB = "proj.job.standing_id"
"""Set on a ``create`` span when a unique job already stood: its id (nothing
was written, no message will follow)."""
EXTRA = "proj[otel]"
"""What to install for tracing: the distributions below."""
EXTRA_MODULES = {
    "opentelemetry.sdk": "opentelemetry-sdk",
    "opentelemetry.instrumentation.celery": "opentelemetry-instrumentation-celery",
    "opentelemetry.instrumentation.flask": "opentelemetry-instrumentation-flask",
    "opentelemetry.instrumentation.sqlalchemy": "opentelemetry-instrumentation-sqlalchemy",
}
"""The modules tracing imports, whatever the exporter, and their distributions."""
EXPORTER_MODULES = {
    "otlp": ("opentelemetry.exporter.otlp.proto.http", "opentelemetry-exporter-otlp-proto-http")
}
"""The module (and distribution) each exporter needs besides those."""

_installations: weakref.WeakSet[Jobs] = weakref.WeakSet()
_wanted = False
_lock = threading.RLock()


@dataclass
class _Tracing:
    """Tracing as it is on in this process."""

    provider: TracerProvider
    tracer: trace.Tracer
    celery: bool
    """Whether proj instrumented Celery (else someone had already)."""
    sql: bool
    """Whether proj instruments its engines (not when every engine is already)."""
    apps: weakref.WeakSet[Flask] = field(default_factory=weakref.WeakSet)
    engines: weakref.WeakSet[Engine] = field(default_factory=weakref.WeakSet)


_active: _Tracing | None = None


def exporter_names(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (none: tracing is off).
    Raises :class:`ConfigurationError` for one proj does not make."""
    value = (os.environ if environ is None else environ).get("OTEL_TRACES_EXPORTER", "")
    names = tuple(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    names = tuple(n for n in names if n != "none")
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={value!r}: proj exports traces to console or otlp "
            "(OTLP over HTTP, to OTEL_EXPORTER_OTLP_ENDPOINT); set one of them, or none."
        )
    return names


def install(jobs: Jobs) -> None:
    """Onto ``jobs.celery_app``, when ``Jobs(...)`` is made: with tracing on
    (the environment's), workers turn it on as they start and flush as they
    stop; with it off, nothing. Raises :class:`ConfigurationError` for an
    exporter proj does not make."""
    global _wanted
    _installations.add(jobs)
    names = exporter_names()
    if not names or _wanted:
        return
    _require_extra(names)
    _wanted = True
    uid = "proj.jobs.tracing"
    signals.worker_init.connect(_start_in_worker, weak=False, dispatch_uid=uid)
    signals.worker_process_init.connect(_start_in_worker, weak=False, dispatch_uid=uid)
    signals.worker_process_shutdown.connect(_flush, weak=False, dispatch_uid=uid)
    signals.worker_shutdown.connect(_flush, weak=False, dispatch_uid=uid)


def init_app(jobs: Jobs, flask_app: Flask) -> None:
    """Onto ``flask_app``, when ``jobs.init_app(flask_app, db)`` runs: with
    tracing on, its requests and its database's SQL are traced."""
    active = _current()
    if active is not None:
        _trace_app(active, jobs, flask_app)


def enable(provider: TracerProvider | None = None) -> TracerProvider:
    """Trace this process from now on; return the provider spans go to (once
    on, later calls return the one in use).

    Without ``provider``: the one the application set globally, if it set an
    SDK one, else one made from the environment (batched, to the exporters
    :func:`exporter_names` reads), set globally. A ``provider`` given is used
    by proj and its instrumentations only, never set globally, so a test can
    turn tracing on and :func:`disable` it again.

    Raises :class:`ConfigurationError` when the ``otel`` extra is not installed.
    """
    global _active
    with _lock:
        if _active is not None:
            return _active.provider
        _require_extra(exporter_names() if provider is None else ())
        from opentelemetry.metrics import NoOpMeterProvider

        provider = provider or _environment_provider()
        instrumentor = _contrib("celery").CeleryInstrumentor()
        celery = not instrumentor.is_instrumented_by_opentelemetry
        if celery:
            # Traces only: metrics are proj.jobs.metrics's.
            instrumentor.instrument(tracer_provider=provider, meter_provider=NoOpMeterProvider())
        tracer = provider.get_tracer(__name__)
        sql = not _contrib("sqlalchemy").SQLAlchemyInstrumentor().is_instrumented_by_opentelemetry
        _active = _Tracing(provider, tracer, celery, sql)
        if sql:
            event.listen(Engine, "engine_connect", _trace_worker_engine)
        return provider


def disable() -> None:
    """Stop tracing in this process: proj's instrumentation is removed and what
    was recorded is flushed (tests: a traced test among untraced ones)."""
    global _active
    with _lock:
        active, _active = _active, None
    if active is None:
        return
    if active.celery:
        _contrib("celery").CeleryInstrumentor().uninstrument()
    if active.sql:
        event.remove(Engine, "engine_connect", _trace_worker_engine)
        _contrib("sqlalchemy.engine").EngineTracer.remove_all_event_listeners()
    for app in list(active.apps):
        _contrib("flask").FlaskInstrumentor.uninstrument_app(app)
    active.provider.force_flush()


def flush() -> None:
    """Export what this process has recorded (a prefork child exits without
    running ``atexit``)."""
    active = _active
    if active is not None:
        active.provider.force_flush()


@contextmanager
def creating(
    jobs: Jobs, task_name: str, job_ids: list[str], options: Mapping[str, Any]
) -> Iterator[Span]:
    """Around the writing of jobs' rows (of one task, with the same options):
    one ``create <task>`` span, current, so the context the rows keep is this
    span's (a no-op span with tracing off). It names one job's id, or a
    batch's size (``enqueue_many``)."""
    active = _current()
    if active is None:
        yield INVALID_SPAN
        return
    attributes: dict[str, AttributeValue] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "create",
        "messaging.operation.name": "create",
    }
    if len(job_ids) == 1:
        attributes["messaging.message.id"] = job_ids[0]
    else:
        attributes["messaging.batch.message_count"] = len(job_ids)
    queue = _queue_of(jobs, task_name, options)
    if queue:
        attributes["messaging.destination.name"] = queue
    with active.tracer.start_as_current_span(
        f"create {task_name}", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        yield span


@contextmanager
def publishing(message: Mapping[str, Any]) -> Iterator[None]:
    """Around one publish of a job's message: the job's creation context is
    the current one, whoever publishes it and whatever span is current (a
    request's, a relay batch's), so the Celery instrumentation's publish span
    is the ``create`` span's child. A publish that fails does not leave that
    span open, nor current."""
    active = _current()
    if active is None:
        yield
        return
    carried = message.get("context") or {}
    fields = {k: str(carried[k]) for k in TRACE_FIELDS if k in carried}
    current = otel_context.get_current()
    token = otel_context.attach(propagate.extract(fields, context=current) if fields else current)
    try:
        yield
    except Exception as exc:
        _end_failed_publish(str(message["name"]), str(message["id"]), exc)
        raise
    finally:
        otel_context.detach(token)


@contextmanager
def sending(messages: Sequence[Mapping[str, Any]]) -> Iterator[None]:
    """Around the publishing of a batch of owed jobs: a ``send`` span that
    links to each job's creation context (their publish spans are children of
    those, not of this)."""
    active = _current()
    if active is None:
        yield
        return
    links = []
    for message in messages:
        carried = message.get("context") or {}
        fields = {k: str(carried[k]) for k in TRACE_FIELDS if k in carried}
        created = trace.get_current_span(propagate.extract(fields)).get_span_context()
        if created.is_valid:
            links.append(Link(created, {"messaging.message.id": str(message["id"])}))
    attributes: dict[str, AttributeValue] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.batch.message_count": len(messages),
    }
    with active.tracer.start_as_current_span(
        "send", kind=SpanKind.CLIENT, links=links, attributes=attributes
    ):
        yield


def missing_packages(exporters: Sequence[str] = ()) -> list[str]:
    """The distributions of the ``otel`` extra that tracing to ``exporters``
    needs and this environment lacks (none: tracing can be turned on)."""
    needed = dict(EXTRA_MODULES)
    needed.update(EXPORTER_MODULES[name] for name in exporters if name in EXPORTER_MODULES)
    return [dist for module, dist in needed.items() if not _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _require_extra(exporters: Sequence[str]) -> None:
    """Raise :class:`ConfigurationError` unless tracing to ``exporters`` (those
    the environment names; none: a provider the caller made) can be turned on."""
    missing = missing_packages(exporters)
    if not missing:
        return
    lacking = f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed"
    if exporters:
        asked = os.environ.get("OTEL_TRACES_EXPORTER", "")
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={asked!r} turns tracing on, but {lacking}: "
            f"pip install '{EXTRA}', or set OTEL_TRACES_EXPORTER=none."
        )
    raise ConfigurationError(f"Tracing needs the {EXTRA} extra ({lacking}): pip install '{EXTRA}'.")


def _current() -> _Tracing | None:
    """Tracing in this process, turned on now if the environment asks for it."""
    if _active is None and _wanted:
        enable()
    return _active


def _environment_provider() -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    configured = trace.get_tracer_provider()
    if isinstance(configured, TracerProvider):
        return configured
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for name in exporter_names():
        provider.add_span_processor(BatchSpanProcessor(_per_process(_exporter_factory(name))))
    trace.set_tracer_provider(provider)
    return provider


def _exporter_factory(name: str) -> Callable[[], SpanExporter]:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # The process's own stdout: a worker redirects sys.stdout to its log
        # as warnings.
        out = sys.__stdout__ or sys.stdout
        return lambda: ConsoleSpanExporter(out=out)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter


def _per_process(make: Callable[[], SpanExporter]) -> SpanExporter:
    """An exporter made again in a forked child (the SDK restarts its batch
    thread there, but an HTTP session's pooled sockets would be the parent's)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class PerProcess(SpanExporter):
        def __init__(self) -> None:
            self.pid, self.exporter = os.getpid(), make()

        def mine(self) -> SpanExporter:
            if self.pid != os.getpid():
                self.pid, self.exporter = os.getpid(), make()
            return self.exporter

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return self.mine().export(spans)

        def shutdown(self) -> None:
            self.mine().shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.mine().force_flush(timeout_millis)

    return PerProcess()


def _start_in_worker(**_: Any) -> None:
    # worker_init (the main process: every pool, and the relay thread) and
    # worker_process_init (a prefork child: on already, from its parent).
    enable()


def _flush(**_: Any) -> None:
    flush()


def _trace_app(active: _Tracing, jobs: Jobs, flask_app: Flask) -> None:
    from opentelemetry.metrics import NoOpMeterProvider

    with _lock:
        if not getattr(flask_app, "_is_instrumented_by_opentelemetry", False):
            _contrib("flask").FlaskInstrumentor.instrument_app(
                flask_app, tracer_provider=active.provider, meter_provider=NoOpMeterProvider()
            )
            active.apps.add(flask_app)
    if active.sql and jobs.flask_db is not None and jobs.flask_app is flask_app:
        with flask_app.app_context():
            for engine in jobs.flask_db.engines.values():
                _trace_engine(active, engine)


def _trace_worker_engine(connection: Connection) -> None:
    """Every engine's ``engine_connect`` while tracing is on: the worker tier's
    engine (made on first use in each process) is traced from its first use."""
    active, engine = _active, connection.engine
    if active is None or engine in active.engines:
        return
    if any(jobs._engine is engine for jobs in list(_installations)):
        _trace_engine(active, engine)


def _trace_engine(active: _Tracing, engine: Engine) -> None:
    from opentelemetry.metrics import NoOpMeterProvider

    sqlalchemy = _contrib("sqlalchemy.engine")
    with _lock:
        if engine in active.engines:
            return
        tracer = active.provider.get_tracer(sqlalchemy.__name__)
        usage = NoOpMeterProvider().get_meter(sqlalchemy.__name__).create_up_down_counter("unused")
        sqlalchemy.EngineTracer(tracer, engine, usage)
        active.engines.add(engine)


def _end_failed_publish(task_name: str, job_id: str, exc: Exception) -> None:
    """End the publish span of a publish that raised: the Celery instrumentation
    ends it (and makes its parent current again) only once the message is sent."""
    utils = _contrib("celery.utils")
    task = utils.retrieve_task_from_sender({"sender": task_name})
    found = utils.retrieve_context(task, job_id, is_publish=True)
    if found is None:
        return
    _, activation, _ = found
    utils.detach_context(task, job_id, is_publish=True)
    # As the instrumentation's own after_task_publish would, with the error
    # recorded: the span ends, and the context before it is current again.
    activation.__exit__(type(exc), exc, exc.__traceback__)


def _contrib(name: str) -> Any:
    """``opentelemetry.instrumentation.<name>``, imported once tracing is on
    (they import much, and carry no types)."""
    return importlib.import_module(f"opentelemetry.instrumentation.{name}")


def _queue_of(jobs: Jobs, task_name: str, options: Mapping[str, Any]) -> str | None:
    """The queue the job's message goes to: its option, else the app's routes."""
    queue = options.get("queue")
    if queue is None:
        try:
            queue = jobs.celery_app.amqp.router.route(dict(options), task_name).get("queue")
        except Exception:  # a route that cannot be resolved now: the span goes without
            return None
    name = getattr(queue, "name", queue)
    return name if isinstance(name, str) else None
