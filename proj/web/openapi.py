"""The OpenAPI document of proj's HTTP API, served at ``/api/openapi.json``.

It is proj's own routes (users, invoices, charges, reports, the health
check) with proj.jobs's job API, audit trail and metrics endpoint where
the application mounts them. It is written out, not derived: ``tests/integration/test_openapi.py``
checks it against the routes and real answers.

The document needs no token: it says no more than the documentation does,
it is the same for every installation, and tools (client generators,
Swagger UI) fetch it without one.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Response, jsonify

from proj.jobs import openapi
from proj.jobs.auth import Role
from proj.jobs.openapi import error, json_body, requires, response, schema
from proj.models import MAX_ID
from proj.web.api import MAX_AMOUNT_CENTS

JOBS_PREFIX = "/api/jobs"
QUEUES_PREFIX = "/api/queues"
AUDIT_PREFIX = "/api/audit"
METRICS_PREFIX = "/metrics"
DOCUMENT_PATH = "/api/openapi.json"

DESCRIPTION = """\
The reference application's API. Every request but the health check and this
document needs an API token (`Authorization: Bearer <token>`): a viewer's
reads, an operator's also writes. A token made for a tenant acts for it: what
it makes is the tenant's, and another tenant's user, invoice or job is a 404.

Work that takes time is answered `202 Accepted` with the job's id and a
`Location` to follow it at. Every error is JSON, `{"error": {"code", "message",
"fields"?}}`: `code` is for programs, `message` for people.
"""

TAGS = [
    {"name": "users", "description": "Sign-ups (each one sends a welcome mail)."},
    {"name": "invoices", "description": "Invoices, and charging them."},
    {"name": "reports", "description": "Reports on a user's invoices, made in the background."},
    {"name": "service", "description": "The health check and this document."},
]

ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
TIME = {"type": "string", "format": "date-time"}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


def _object(description: str, fields: dict[str, Any], *, required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": fields,
        "required": required,
    }


def _answer(description: str, fields: dict[str, Any]) -> dict[str, Any]:
    # An answer always carries every field (null when unknown).
    return _object(description, fields, required=list(fields))


SCHEMAS: dict[str, Any] = {
    "User": _answer(
        "Someone who signed up.",
        {
            "id": ID,
            "email": {"type": "string"},
            "created_at": TIME,
            "welcomed_at": {**NULLABLE_TIME, "description": "When the welcome mail went out."},
        },
    ),
    "Invoice": _answer(
        "An amount a user owes; charged at most once.",
        {
            "id": ID,
            "user_id": ID,
            "amount_cents": {"type": "integer", "minimum": 1},
            "status": {"type": "string", "enum": ["open", "charged"]},
            "charge_id": {"type": ["string", "null"], "description": "The gateway's charge."},
            "created_at": TIME,
            "charged_at": NULLABLE_TIME,
            "receipt_sent_at": {**NULLABLE_TIME, "description": "When its receipt was mailed."},
        },
    ),
    "Accepted": _answer(
        "Work accepted as a job; the `Location` header is where to follow it.",
        {"job_id": {"type": "string"}},
    ),
    "Health": _answer(
        "Everything answers.",
        {name: {"const": "ok"} for name in ("status", "database", "broker")},
    ),
    "NewUser": _object(
        "A sign-up.",
        {"email": {"type": "string", "format": "email", "maxLength": 320}},
        required=["email"],
    ),
    "NewInvoice": _object(
        "An invoice to make.",
        {
            "user_id": {**ID, "description": "A user the token may see."},
            "amount_cents": {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT_CENTS},
        },
        required=["user_id", "amount_cents"],
    ),
    "NewReport": _object(
        "A report to make.",
        {"user_id": {**ID, "description": "A user the token may see."}},
        required=["user_id"],
    ),
    "NewMonthlyReport": _object(
        "A monthly report to make, over every user the token may see.",
        {"month": {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"}},
        required=["month"],
    ),
    "AcceptedCanvas": _answer(
        "Accepted as a canvas of jobs.",
        {"canvas_id": {"type": "string", "description": "Its steps: `GET /api/jobs?canvas=`."}},
    ),
}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema(name)}}}


def _id(name: str, what: str) -> dict[str, Any]:
    # The route takes any whole number; one no row can have is a 404.
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": f"The {what}'s id.",
        "schema": {"type": "integer"},
    }


def _made(description: str, name: str) -> dict[str, Any]:
    return json_body(description, schema(name), Location="Where it is.")


BAD_BODY = error(
    "The body is not a JSON object (`malformed_json`, `invalid_body`), or `fields` says "
    "which fields are missing or not valid (`invalid_fields`)."
)
NOT_JSON = error("The body is not sent as `application/json` (`unsupported_media_type`).")
ACCEPTED = json_body("Accepted as a job.", schema("Accepted"), Location="The job, in the job API.")
READ, WRITE = requires(Role.VIEWER), requires(Role.OPERATOR)
REFUSED = {"401": response("Unauthorized"), "403": response("Forbidden")}


def own_paths() -> dict[str, Any]:
    """proj's own routes (not the job API's nor the metrics')."""
    return {
        "/api/users": {
            "post": {
                "operationId": "create_user",
                "tags": ["users"],
                "summary": "Sign a user up",
                "description": "The welcome mail is sent in the background, once.",
                "security": WRITE,
                "requestBody": _body("NewUser"),
                "responses": {
                    "201": _made("Signed up.", "User"),
                    "400": BAD_BODY,
                    **REFUSED,
                    "409": error("The email is signed up already (`conflict`)."),
                    "415": NOT_JSON,
                },
            }
        },
        "/api/users/{user_id}": {
            "get": {
                "operationId": "get_user",
                "tags": ["users"],
                "summary": "A user",
                "security": READ,
                "parameters": [_id("user_id", "user")],
                "responses": {
                    "200": json_body("The user.", schema("User")),
                    "401": response("Unauthorized"),
                    "404": error("No user with this id that the token may see."),
                },
            }
        },
        "/api/invoices": {
            "post": {
                "operationId": "create_invoice",
                "tags": ["invoices"],
                "summary": "Make an invoice",
                "security": WRITE,
                "requestBody": _body("NewInvoice"),
                "responses": {
                    "201": _made("Made.", "Invoice"),
                    "400": BAD_BODY,
                    **REFUSED,
                    "415": NOT_JSON,
                },
            }
        },
        "/api/invoices/{invoice_id}": {
            "get": {
                "operationId": "get_invoice",
                "tags": ["invoices"],
                "summary": "An invoice",
                "security": READ,
                "parameters": [_id("invoice_id", "invoice")],
                "responses": {
                    "200": json_body("The invoice.", schema("Invoice")),
                    "401": response("Unauthorized"),
                    "404": error("No invoice with this id that the token may see."),
                },
            }
        },
        "/api/invoices/{invoice_id}/charge": {
            "post": {
                "operationId": "charge",
                "tags": ["invoices"],
                "summary": "Charge an invoice",
                "description": (
                    "Through the payment gateway, in the background, once however often it "
                    "is asked: asked again while its charge waits or runs, the answer is the "
                    "same job; an invoice charged already is not charged again."
                ),
                "security": WRITE,
                "parameters": [_id("invoice_id", "invoice")],
                "responses": {
                    "202": ACCEPTED,
                    **REFUSED,
                    "404": error("No invoice with this id that the token may see."),
                },
            }
        },
        "/api/reports": {
            "post": {
                "operationId": "create_report",
                "tags": ["reports"],
                "summary": "Make a report on a user's invoices",
                "description": "The job's `result` is the report; its `progress` goes up to 100.",
                "security": WRITE,
                "requestBody": _body("NewReport"),
                "responses": {
                    "202": ACCEPTED,
                    "400": BAD_BODY,
                    **REFUSED,
                    "415": NOT_JSON,
                },
            }
        },
        "/api/reports/monthly": {
            "post": {
                "operationId": "create_monthly_report",
                "tags": ["reports"],
                "summary": "Make every user's report, then mail their sum",
                "description": (
                    "A chord on the job ledger: a report job a user, then one job that "
                    "mails their sum to the operators, released once by the last report."
                ),
                "security": WRITE,
                "requestBody": _body("NewMonthlyReport"),
                "responses": {
                    "202": json_body(
                        "Accepted.",
                        schema("AcceptedCanvas"),
                        Location="The canvas's steps, in the job API.",
                    ),
                    "400": BAD_BODY,
                    **REFUSED,
                    "415": NOT_JSON,
                },
            }
        },
        DOCUMENT_PATH: {
            "get": {
                "operationId": "openapi_document",
                "tags": ["service"],
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "tags": ["service"],
                "summary": "Whether the database and the broker answer",
                "description": "Both at once; the answer comes within seconds, whatever they do.",
                "security": [],
                "responses": {
                    "200": json_body("Both answer.", schema("Health")),
                    "503": error(
                        "One or both do not (`unavailable`); `fields` says how each failed."
                    ),
                },
            }
        },
    }


def document() -> dict[str, Any]:
    """The whole document: proj's routes, the job API at ``JOBS_PREFIX``,
    the queues at ``QUEUES_PREFIX``, the audit trail at ``AUDIT_PREFIX`` and
    the metrics at ``METRICS_PREFIX``.
    Every operation may also answer any other error in the same JSON shape
    (a 503 when the database does not answer, a 405, a 413…): that is its
    ``default`` response."""
    paths = {
        **own_paths(),
        **openapi.job_api_paths(JOBS_PREFIX),
        **openapi.queue_paths(QUEUES_PREFIX),
        **openapi.audit_paths(AUDIT_PREFIX),
        **openapi.metrics_paths(METRICS_PREFIX),
    }
    other = error("Any other error, in the same shape (`database_unavailable`, …).")
    for item in paths.values():
        for operation in item.values():
            operation["responses"].setdefault("default", other)
    return openapi.describe(
        title="proj",
        version=_version(),
        description=DESCRIPTION,
        paths=paths,
        tags=TAGS,
        own_schemas=SCHEMAS,
    )


def _version() -> str:
    try:
        return version("proj")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def openapi_document() -> Response:
    """``GET /api/openapi.json``: :func:`document`, to anyone (no token)."""
    return jsonify(document())
