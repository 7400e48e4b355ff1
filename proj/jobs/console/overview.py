"""The console's overview (and its queues' pause and resume), periodic
tasks, workers, tokens and audit pages, every figure from the ledger
(:mod:`~proj.jobs.console.figures`, :mod:`~proj.jobs.console.schedules`,
:mod:`~proj.jobs.console.fleet`, :mod:`~proj.jobs.audit`)."""

from __future__ import annotations

from typing import Any

from flask import current_app, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from proj.jobs import audit, queues
from proj.jobs.auth import request_session
from proj.jobs.auth import tokens as api_tokens
from proj.jobs.clock import utcnow
from proj.jobs.console import charts, wording
from proj.jobs.console.figures import ACTIVE, OUTCOMES
from proj.jobs.console.figures import overview as overview_figures
from proj.jobs.console.filters import Queues
from proj.jobs.console.fleet import fleet
from proj.jobs.console.schedules import SLOTS_BACK, periodic_rows
from proj.jobs.console.site import Refused, blueprint
from proj.jobs.extension import EXTENSION_KEY, Jobs
from proj.jobs.http import whole_number
from proj.jobs.models import State

REFRESH = 10
"""Seconds between reloads of the overview and workers pages."""
AUDIT_PAGE_SIZE = 50
"""Entries on one page of the audit trail."""


def _jobs() -> Jobs:
    jobs: Jobs = current_app.extensions[EXTENSION_KEY]
    return jobs


def _page(template: str, **context: Any) -> str:
    return render_template(f"proj_console/{template}", wording=wording, **context)


@blueprint.get("/")
def overview() -> str:
    """Jobs by state and by queue, the last hour's finished jobs per minute,
    waiting jobs per queue, the relay's debt and the failure rate; each
    queue, paused or not (by whom, since when)."""
    session = request_session()
    celery_app = _jobs().celery_app
    figures = overview_figures(session, celery_app)
    # Waiting jobs as the figures count them (to their cap), not counted again.
    listed = {queue.name: queue for queue in queues.with_pauses(session, figures.waiting)}
    for name in Queues(celery_app).names():
        listed.setdefault(name, queues.QueueState(name))
    return _page(
        "overview.html",
        refresh=REFRESH,
        figures=figures,
        states=list(State),
        active=ACTIVE,
        chart=charts.stacked_bars(figures.per_minute, [str(state) for state in OUTCOMES]),
        waiting=charts.horizontal_bars(figures.waiting, str(State.QUEUED)),
        queues=[listed[name] for name in sorted(listed)],
    )


@blueprint.post("/queues/<queue>/pause")
def pause_queue(queue: str) -> BaseResponse:
    """Pause a queue; back to the overview with what happened."""
    session = request_session()
    name = _queue_name(queue)
    if queues.pause(session, name, by=audit.requester()):
        audit.record_request(session, audit.Action.QUEUE_PAUSE, target=name)
        session.commit()
        flash(f"queue {name} is paused: its jobs wait until it is resumed")
    else:
        flash(f"queue {name} was paused already", "error")
    return redirect(url_for(".overview", _anchor="queues-control"))


@blueprint.post("/queues/<queue>/resume")
def resume_queue(queue: str) -> BaseResponse:
    """Resume a paused queue; back to the overview with what happened."""
    session = request_session()
    name = _queue_name(queue)
    if queues.resume(session, name):
        audit.record_request(session, audit.Action.QUEUE_RESUME, target=name)
        session.commit()
        flash(f"queue {name} is resumed: what waits in it is published")
    else:
        flash(f"queue {name} was not paused", "error")
    return redirect(url_for(".overview", _anchor="queues-control"))


def _queue_name(queue: str) -> str:
    try:
        return queues.checked(queue)
    except queues.InvalidQueueName as exc:
        raise Refused(400, "invalid_queue", str(exc)) from None


@blueprint.get("/periodic")
def periodic() -> str:
    """Each beat entry: its task, its schedule, its last run and its next."""
    now = utcnow()
    rows = periodic_rows(request_session(), _jobs().celery_app, now)
    return _page("periodic.html", rows=rows, now=now, slots_back=SLOTS_BACK)


@blueprint.get("/workers")
def workers() -> str:
    """Each worker's heartbeat, whether it is alive, and the jobs it runs."""
    settings = _jobs().settings
    now = utcnow()
    found = fleet(request_session(), settings.stale_after, now)
    return _page("workers.html", refresh=REFRESH, fleet=found, settings=settings, now=now)


@blueprint.get("/tokens")
def tokens() -> str:
    """The API tokens: name, role, tenant, last use and expiry (never the
    token, which is shown once, when ``proj token add`` makes it)."""
    return _page("tokens.html", tokens=api_tokens(request_session()), now=utcnow())


@blueprint.get("/audit")
def audit_trail() -> str:
    """The audit trail, every tenant's, newest first, 50 a page; ``before``
    (an entry's id) continues after that entry."""
    raw = request.args.get("before")
    before = whole_number(raw) if raw else None
    if raw and (before is None or before > audit.MAX_ID):
        raise Refused(400, "invalid_query", "before must be an entry's id (a whole number)")
    found = audit.page(request_session(), AUDIT_PAGE_SIZE, before)
    older = url_for(".audit_trail", before=found.older) if found.older is not None else None
    return _page("audit.html", entries=found.entries, older=older, paged=before is not None)
