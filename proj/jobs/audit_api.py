"""``GET /api/audit``: the audit trail (:mod:`proj.jobs.audit`), newest
first. A blueprint to mount once ``jobs.init_app(flask_app, db)`` has run::

    flask_app.register_blueprint(proj.jobs.audit_api.blueprint, url_prefix="/api/audit")

It needs an API token as the job API does, and a viewer's reads it, as it
reads everything else. A token sees the entries of its tenant only (what
that tenant's tokens did), and a token with no tenant the entries of no
tenant (the console's, the commands', and those of tokens with no tenant).
``limit`` pages; ``before`` (an entry's id) continues after that entry,
as the ``next`` link does.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, url_for

from proj.jobs import audit
from proj.jobs.api import JobApiError, page_limit
from proj.jobs.auth import request_session, require_token, token_tenant
from proj.jobs.http import json_error, whole_number

blueprint = Blueprint("audit", __name__)
"""``GET /api/audit``: mount it with ``flask_app.register_blueprint(blueprint, url_prefix=...)``."""
require_token(blueprint)


@blueprint.errorhandler(JobApiError)
def _answer(error: JobApiError) -> tuple[Response, int]:
    return json_error(error.status, error.code, error.message, error.fields)


@blueprint.get("")
def list_audit() -> Response:
    """The token's tenant's entries, newest first; ``limit`` pages, ``before``
    continues after the last entry of the previous page (the ``next`` link has it)."""
    limit = page_limit(request.args.get("limit"))
    before = _before(request.args.get("before"))
    found = audit.page(request_session(), limit, before, audit.of_tenant(token_tenant()))
    following = None
    if found.older is not None:
        following = url_for(".list_audit", limit=limit, before=found.older)
    return jsonify(entries=[entry.to_json() for entry in found.entries], next=following)


def _before(raw: str | None) -> int | None:
    if raw is None:
        return None
    before = whole_number(raw)
    if before is None or not 1 <= before <= audit.MAX_ID:
        message = f"before must be an entry's id, 1 to {audit.MAX_ID}"
        raise JobApiError(400, "invalid_query", message, {"before": raw})
    return before
