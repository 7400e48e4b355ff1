"""The job API: status and control of jobs, from the ledger.

A blueprint to mount where you like, once ``jobs.init_app(flask_app, db)``
has run::

    flask_app.register_blueprint(proj.jobs.api.blueprint, url_prefix="/api/jobs")

Every request needs an API token (``Authorization: Bearer <token>``, see
:mod:`proj.jobs.auth`): a viewer's reads, an operator's also retries and
cancels. A token sees its tenant's jobs only, and a token with no tenant
the jobs of no tenant (another tenant's job is a 404), as row-level
security does for an application's tables. Each retry and cancel is
recorded in the audit trail (:mod:`proj.jobs.audit`), in the change's transaction.
Every error it answers is JSON: ``{"error": {"code", "message", "fields"?}}``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from sqlalchemy import false, select
from sqlalchemy.orm import Session

from proj.jobs import actions, audit, ledger, listing, revoke
from proj.jobs.auth import request_session, require_token, token_tenant
from proj.jobs.extension import EXTENSION_KEY, Jobs
from proj.jobs.http import json_error, whole_number
from proj.jobs.models import Job, State

blueprint = Blueprint("jobs", __name__)
"""The job API: mount it with ``flask_app.register_blueprint(blueprint, url_prefix=...)``."""
require_token(blueprint)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class JobApiError(Exception):
    """An error the job API answers as it is, in JSON."""

    def __init__(
        self, status: int, code: str, message: str, fields: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields


@blueprint.errorhandler(JobApiError)
def _answer(error: JobApiError) -> tuple[Response, int]:
    return json_error(error.status, error.code, error.message, error.fields)


def _jobs() -> Jobs:
    jobs: Jobs = current_app.extensions[EXTENSION_KEY]
    return jobs


def _session() -> Session:
    return request_session()


def job_or_404(job_id: str) -> Job:
    # No id proj issues is longer, or holds a NUL (which PostgreSQL refuses in text).
    job = _session().get(Job, job_id) if len(job_id) <= 255 and "\x00" not in job_id else None
    if job is not None and job.tenant != token_tenant():
        job = None  # another tenant's job is no job of this token's
    if job is None:
        raise JobApiError(404, "not_found", f"no job with id {job_id}")
    return job


@blueprint.get("/<job_id>")
def get_job(job_id: str) -> Response:
    """The job, with ``errors``: each attempt that ended in an error, oldest first."""
    job = job_or_404(job_id)
    errors = [attempt.to_json() for attempt in ledger.attempts_of(_session(), job_id)]
    return jsonify({**job.to_json(), "errors": errors})


@blueprint.get("")
def list_jobs() -> Response:
    """Newest first; ``state`` and ``canvas`` filter, ``limit`` pages,
    ``before`` continues after the last job of the previous page (the
    ``next`` link has it)."""
    state = request.args.get("state")
    if state is not None and state not in set(State):
        allowed = ", ".join(State)
        raise JobApiError(400, "invalid_query", f"state must be one of {allowed}", {"state": state})
    limit = page_limit(request.args.get("limit"))
    # Every listing is one tenant's (or no tenant's).
    tenant = token_tenant()
    where = [Job.tenant.is_(None) if tenant is None else Job.tenant == tenant]
    canvas = request.args.get("canvas")
    if canvas is not None:
        # No canvas id proj issues holds a NUL (which PostgreSQL refuses in text).
        where.append(Job.canvas_id == canvas if "\x00" not in canvas else false())
    before = request.args.get("before")
    after = None
    if before is not None:
        last = job_or_404(before)
        after = (last.created_at, last.id)
    columns = (Job.id, Job.created_at)
    query = listing.newest(
        columns, where, limit + 1, state=state, after=after, leading=[Job.tenant]
    )
    ids = list(_session().scalars(query))
    newest = (Job.created_at.desc(), Job.id.desc())
    found = []
    if ids:  # none: no query (see proj.jobs.console.jobs._searched)
        found = list(_session().scalars(select(Job).where(Job.id.in_(ids)).order_by(*newest)))
    page = found[:limit]
    following = None
    if len(found) > limit:
        args: dict[str, Any] = {"limit": limit, "before": page[-1].id}
        if state is not None:
            args["state"] = state
        if canvas is not None:
            args["canvas"] = canvas
        following = url_for(".list_jobs", **args)
    return jsonify(jobs=[job.to_json() for job in page], next=following)


def page_limit(raw: str | None) -> int:
    """The ``limit`` query argument ``raw`` (``DEFAULT_LIMIT`` when not
    given); :class:`JobApiError` (400) unless it is 1 to ``MAX_LIMIT``."""
    if raw is None:
        return DEFAULT_LIMIT
    limit = whole_number(raw)
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        raise JobApiError(
            400,
            "invalid_query",
            f"limit must be a whole number from 1 to {MAX_LIMIT}",
            {"limit": raw},
        )
    return limit


@blueprint.post("/<job_id>/retry")
def retry_job(job_id: str) -> tuple[Response, int]:
    """Run a failed job again (its attempts start over)."""
    job = job_or_404(job_id)
    session = _session()
    try:
        actions.retry(session, _jobs(), job)
    except actions.NotActionable as exc:
        raise JobApiError(409, "conflict", str(exc)) from None
    audit.record_request(session, audit.Action.JOB_RETRY, target=job_id)
    session.refresh(job)
    answer = job.to_json()  # as requeued: once committed, a worker may take it at once
    session.commit()
    return jsonify(answer), 202


@blueprint.post("/<job_id>/cancel")
def cancel_job(job_id: str) -> tuple[Response, int]:
    """Cancel a job: a waiting one at once (it will never run: 200); a running
    one is asked to stop (202), which it sees at its next check
    (``check_cancelled()``, or its next progress report): then it ends
    ``cancelled``; a job that never checks finishes as it would have."""
    job = job_or_404(job_id)
    session = _session()
    try:
        was = actions.cancel(session, job)
    except actions.NotActionable as exc:
        session.rollback()
        raise JobApiError(409, "conflict", str(exc)) from None
    audit.record_request(session, audit.Action.JOB_CANCEL, target=job_id, detail={"was": was})
    session.commit()
    if was != State.RUNNING:  # a running one is announced by its worker when it stops
        revoke.announce(_jobs().celery_app, [job_id])
    session.expire(job)
    answer = job_or_404(job_id).to_json()
    if was == State.RUNNING:
        answer["message"] = (
            "the job is running: it is asked to stop and ends cancelled at its next check; "
            "a job that does not check finishes normally"
        )
        return jsonify(answer), 202
    return jsonify(answer), 200
