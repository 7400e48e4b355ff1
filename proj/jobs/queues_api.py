"""The queue API: which queues are paused, and pausing or resuming one
(:mod:`proj.jobs.queues`). A blueprint to mount once ``jobs.init_app(flask_app, db)``
has run::

    flask_app.register_blueprint(proj.jobs.queues_api.blueprint, url_prefix="/api/queues")

It needs an API token as the job API does: a viewer's reads, an operator's
also pauses and resumes, if it has no tenant (a paused queue holds every
tenant's jobs; a tenant's token gets 403). Each pause and resume is
recorded in the audit trail, in its transaction.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from proj.jobs import audit, queues
from proj.jobs.api import JobApiError
from proj.jobs.auth import request_session, require_token, token_tenant
from proj.jobs.http import json_error
from proj.jobs.models import Job

blueprint = Blueprint("queues", __name__)
"""The queue API: mount it with ``flask_app.register_blueprint(blueprint, url_prefix=...)``."""
require_token(blueprint)


@blueprint.errorhandler(JobApiError)
def _answer(error: JobApiError) -> tuple[Response, int]:
    return json_error(error.status, error.code, error.message, error.fields)


@blueprint.get("")
def list_queues() -> Response:
    """Each queue that is paused or has jobs waiting: whether it is paused (by
    whom, since when), and how many of the token's tenant's jobs wait in it."""
    tenant = token_tenant()
    mine = Job.tenant.is_(None) if tenant is None else Job.tenant == tenant
    return jsonify(queues=[queue.to_json() for queue in queues.listing(request_session(), mine)])


@blueprint.post("/<queue>/pause")
def pause_queue(queue: str) -> Response:
    """Pause ``queue``; its state (paused already: as it was, the first
    pause's author and time kept)."""
    session = request_session()
    name = _checked(queue)
    if queues.pause(session, name, by=audit.requester()):
        audit.record_request(session, audit.Action.QUEUE_PAUSE, target=name)
    session.commit()
    return jsonify(_without_count(queues.state(session, name)))


@blueprint.post("/<queue>/resume")
def resume_queue(queue: str) -> Response:
    """Resume ``queue``; its state (not paused: as it was)."""
    session = request_session()
    name = _checked(queue)
    if queues.resume(session, name):
        audit.record_request(session, audit.Action.QUEUE_RESUME, target=name)
    session.commit()
    return jsonify(_without_count(queues.state(session, name)))


def _checked(queue: str) -> str:
    if token_tenant() is not None:
        raise JobApiError(
            403,
            "forbidden",
            "a tenant's token cannot pause or resume a queue: it holds every tenant's jobs",
        )
    try:
        return queues.checked(queue)
    except queues.InvalidQueueName as exc:
        raise JobApiError(400, "invalid_queue", str(exc), {"queue": queue[:300]}) from None


def _without_count(queue: queues.QueueState) -> dict[str, Any]:
    answer = queue.to_json()
    del answer["waiting"]  # not counted
    return answer
