"""Job status and control, from the ledger: ``/api/jobs``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from sqlalchemy import select, tuple_, update

from proj.db import utcnow
from proj.deadletter import UNRUNNABLE
from proj.ledger import Job, State
from proj.outbox import requeue
from proj.web.errors import ApiError
from proj.web.extensions import db

jobs = Blueprint("jobs", __name__, url_prefix="/api/jobs")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def job_or_404(job_id: str) -> Job:
    job = db.session.get(Job, job_id) if len(job_id) <= 255 else None
    if job is None:
        raise ApiError(404, "not_found", f"no job with id {job_id}")
    return job


@jobs.get("/<job_id>")
def get_job(job_id: str) -> Response:
    return jsonify(job_or_404(job_id).to_json())


@jobs.get("")
def list_jobs() -> Response:
    """Newest first; ``state`` filters, ``limit`` pages, ``before`` continues
    after the last job of the previous page (the ``next`` link has it)."""
    state = request.args.get("state")
    if state is not None and state not in set(State):
        allowed = ", ".join(State)
        raise ApiError(400, "invalid_query", f"state must be one of {allowed}", {"state": state})
    limit = _limit(request.args.get("limit"))
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if state is not None:
        query = query.where(Job.state == state)
    before = request.args.get("before")
    if before is not None:
        last = job_or_404(before)
        query = query.where(tuple_(Job.created_at, Job.id) < (last.created_at, last.id))
    found = list(db.session.scalars(query))
    page = found[:limit]
    following = None
    if len(found) > limit:
        args: dict[str, Any] = {"limit": limit, "before": page[-1].id}
        if state is not None:
            args["state"] = state
        following = url_for("jobs.list_jobs", **args)
    return jsonify(jobs=[job.to_json() for job in page], next=following)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(
            400,
            "invalid_query",
            f"limit must be a whole number from 1 to {MAX_LIMIT}",
            {"limit": raw},
        )
    return int(raw)


@jobs.post("/<job_id>/retry")
def retry_job(job_id: str) -> tuple[Response, int]:
    """Run a failed job again (its attempts start over)."""
    job = job_or_404(job_id)
    if job.state != State.FAILED:
        raise ApiError(
            409, "conflict", f"job {job_id} is {job.state}; only a failed job is retried"
        )
    if (job.options or {}).get(UNRUNNABLE):
        raise ApiError(409, "conflict", f"job {job_id} is a message no worker could read")
    if not requeue(db.session(), job, current_app.extensions["proj.celery"]):
        raise ApiError(409, "conflict", f"job {job_id} changed state; look again")
    db.session.refresh(job)
    answer = job.to_json()  # as requeued: once committed, a worker may take it at once
    db.session.commit()
    return jsonify(answer), 202


@jobs.post("/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    """Cancel a job that has not started; it will never run."""
    job = job_or_404(job_id)
    done = db.session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_((State.QUEUED, State.RETRYING)))
        .values(state=State.CANCELLED, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 0) != 1:
        db.session.rollback()
        raise ApiError(
            409, "conflict", f"job {job_id} is {job.state}; only a waiting job is cancelled"
        )
    db.session.commit()
    db.session.expire(job)
    return jsonify(job_or_404(job_id).to_json())
