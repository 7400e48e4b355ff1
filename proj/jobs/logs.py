"""Structured logs: with ``PROJ_LOG_FORMAT=json`` every process of an
installation writes one JSON object a line to stderr, and human-readable text
(Celery's and Flask's own) stays the default.

Each line is python-json-logger's :class:`~pythonjsonlogger.json.JsonFormatter`
output with ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``,
and whenever they are known: ``job_id``, ``task``, ``attempt`` and ``queue``
(the job being run, or the one Celery's own line is about), ``trace_id`` and
``span_id`` (the current span), ``tenant`` and ``request_id`` (the context
:mod:`proj.jobs.context` carries); a traceback is the string ``exc_info``,
inside the same line. Extra fields a call passes are kept.

Nothing happens at import; JSON is set up once per process:

- a worker (main process and prefork children) or beat: from Celery's
  ``setup_logging`` signal, at ``--loglevel`` (Celery then leaves the root
  logger alone); the worker's banner is left out and, as Celery would, what
  tasks print goes to the log. Beat prints its banner before any signal: run
  it as ``celery --quiet beat``.
- the web tier: :func:`init_app`, werkzeug's request log included;
- a command of your own (``proj relay``, ``proj run``): :func:`start`.

:func:`init_app` also gives every request an id: its ``X-Request-ID`` header
when that is up to 128 characters of ``[A-Za-z0-9._-]``, else a new one. The
response echoes it, its log lines carry it, and so does every job enqueued
while it is handled (and that job's log lines).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from celery import signals
from celery._state import get_current_task
from flask import Response, g, request
from flask.logging import default_handler
from opentelemetry.trace import get_current_span
from pythonjsonlogger.json import JsonFormatter

from proj.jobs import context

if TYPE_CHECKING:
    from flask import Flask

    from proj.jobs.extension import Jobs
    from proj.jobs.settings import JobsSettings

JSON = "json"
HANDLER_NAME = "proj.jobs.logs"
"""The name of the root logger's JSON handler (how a second set-up finds it)."""
REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class JobFields(logging.Filter):
    """Adds to each record the fields known where it is logged (see the
    module); a field the call passed itself is left as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in known_fields(record).items():
            record.__dict__.setdefault(name, value)
        return True


def known_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The job, trace and context fields known for ``record`` right now."""
    found: dict[str, Any] = {}
    job = context.running_job.get() or _traced_job()
    data = record.__dict__.get("data")
    if job is not None:
        found.update(job_id=job.job_id, task=job.task, attempt=job.attempt, queue=job.queue)
    elif isinstance(data, Mapping) and data.get("id"):
        # Celery's own lines about a job outside its run ("Task ... received")
        # name it in the ``data`` extra.
        found.update(job_id=str(data["id"]), task=data.get("name"))
    span = get_current_span().get_span_context()
    if span.is_valid:
        found.update(trace_id=f"{span.trace_id:032x}", span_id=f"{span.span_id:016x}")
    found.update(tenant=context.tenant_var.get(), request_id=context.request_id_var.get())
    return {name: value for name, value in found.items() if value is not None}


def _traced_job() -> context.RunningJob | None:
    """The job Celery is tracing in this thread, around its run ("succeeded", "raised")."""
    task = get_current_task()
    request = task.request if task is not None else None
    if task is None or request is None or request.id is None:
        return None
    queue = (request.delivery_info or {}).get("routing_key")
    return context.RunningJob(str(request.id), task.name, (request.retries or 0) + 1, queue)


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing one JSON object a line to ``stream`` (default:
    stderr), with the fields of :class:`JobFields`."""
    handler = logging.StreamHandler(stream)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
            # Placed first in each line; ``timestamp`` fills it in.
            defaults={"time": None},
        )
    )
    handler.addFilter(JobFields())
    return handler


def writes_json() -> bool:
    """Whether this process's root logger writes JSON (:func:`write_json` ran)."""
    return any(h.get_name() == HANDLER_NAME for h in logging.getLogger().handlers)


def write_json(level: int | str | None = None, *, stream: IO[str] | None = None) -> None:
    """From now on the root logger writes JSON to ``stream`` (default:
    stderr), and nothing else: its other handlers are removed, at ``level``
    (default: INFO). Once per process: a later call only sets ``level``, when
    given."""
    root = logging.getLogger()
    if not writes_json():
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(json_handler(stream))
        level = logging.INFO if level is None else level
    if level is not None:
        root.setLevel(level)


def start(settings: JobsSettings, level: int | str | None = None) -> bool:
    """This process's logs as ``settings`` say: with ``json``, :func:`write_json`
    (text leaves logging as it is); whether they are JSON."""
    if settings.log_format != JSON:
        return False
    write_json(level)
    return True


def install(jobs: Jobs) -> None:
    """Onto ``jobs.celery_app``, when ``Jobs(...)`` is made: with ``json``,
    workers and beat set JSON up instead of Celery's own logging."""
    if jobs.settings.log_format != JSON:
        return
    signals.setup_logging.connect(_setup_logging, weak=False, dispatch_uid=HANDLER_NAME)
    signals.celeryd_init.connect(_worker_init, weak=False, dispatch_uid=HANDLER_NAME)
    signals.celeryd_after_setup.connect(_redirect_output, weak=False, dispatch_uid=HANDLER_NAME)


def _setup_logging(loglevel: int | None = None, **_: Any) -> None:
    # Celery's default when no --loglevel is given.
    write_json(loglevel or logging.WARNING)


def _worker_init(instance: Any = None, options: Mapping[str, Any] | None = None, **_: Any) -> None:
    # Celery warns (of running as root, say) before it sets logging up, and
    # prints a banner: the warnings are log lines too, the banner is left out.
    write_json((options or {}).get("loglevel") or logging.WARNING)
    logging.captureWarnings(True)
    if instance is not None:
        instance.quiet = True


def _redirect_output(instance: Any = None, **_: Any) -> None:
    # What Celery does when it sets logging up itself (worker_redirect_stdouts).
    if instance is not None and instance.redirect_stdouts:
        instance.app.log.redirect_stdouts(instance.redirect_stdouts_level)


def init_app(jobs: Jobs, flask_app: Flask) -> None:
    """Onto ``flask_app``, when ``jobs.init_app(flask_app, db)`` runs: request
    ids, and with ``json`` the process's logs (the app's and werkzeug's too)."""
    flask_app.before_request(_take_request_id)
    flask_app.after_request(_echo_request_id)
    flask_app.teardown_request(_forget_request_id)
    if start(jobs.settings):
        flask_app.logger.removeHandler(default_handler)


def _take_request_id() -> None:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    g.proj_request_id = request_id
    g.proj_request_id_token = context.request_id_var.set(request_id)


def _echo_request_id(response: Response) -> Response:
    if "proj_request_id" in g:
        response.headers[REQUEST_ID_HEADER] = g.proj_request_id
    return response


def _forget_request_id(_: BaseException | None = None) -> None:
    token = g.pop("proj_request_id_token", None)
    if token is not None:
        context.request_id_var.reset(token)
