"""The job API, the audit trail and the metrics endpoint described in
OpenAPI 3.1, for an application to serve with its own routes.

The paths depend on where the blueprints are mounted, so they are made for
a prefix; the schemas, error responses and the bearer token scheme they
refer to come with :func:`describe`, which makes the whole document::

    from proj.jobs import openapi

    document = openapi.describe(
        title="Shop API",
        version="1.4.0",
        paths={
            **openapi.job_api_paths("/api/jobs"),
            **openapi.audit_paths("/api/audit"),
            **openapi.metrics_paths("/metrics"),
            **own,
        },
    )

Every description is CommonMark, as OpenAPI asks. Nothing here checks the
routes: an application's tests do, against its ``url_map`` (proj's
``tests/integration/test_openapi.py`` shows how).
"""

from __future__ import annotations

from typing import Any

from proj.jobs.api import DEFAULT_LIMIT, MAX_LIMIT
from proj.jobs.audit import MAX_ID, Action
from proj.jobs.auth import Role
from proj.jobs.models import State

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "apiToken"
"""The name of the bearer token scheme in ``components.securitySchemes``."""

TAGS = [
    {"name": "jobs", "description": "Background jobs: their state, retrying and cancelling."},
    {"name": "queues", "description": "Pausing and resuming queues."},
    {"name": "audit", "description": "Who acted on jobs, signed in, or changed access."},
    {"name": "metrics", "description": "Counters and gauges for Prometheus to scrape."},
]


def schema(name: str) -> dict[str, str]:
    """A reference to the schema ``name`` of ``components.schemas``."""
    return {"$ref": f"#/components/schemas/{name}"}


def response(name: str) -> dict[str, str]:
    """A reference to the response ``name`` of ``components.responses``."""
    return {"$ref": f"#/components/responses/{name}"}


def json_body(description: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    """A response with a JSON ``body``, and ``headers`` (name: description)."""
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": body}},
    }
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return answer


def error(description: str) -> dict[str, Any]:
    """A response with an ``Error`` body, saying when it comes."""
    return json_body(description, schema("Error"))


def requires(role: str) -> list[dict[str, list[str]]]:
    """The security requirement of an operation that needs the token of
    ``role`` (``viewer`` or ``operator``; OpenAPI 3.1 lets a bearer scheme
    name roles, as OAuth names scopes)."""
    return [{SECURITY_SCHEME: [str(role)]}]


NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

JOB_FIELDS: dict[str, Any] = {
    "id": {"type": "string", "description": "The job's id (its Celery task id)."},
    "name": {"type": "string", "description": "The task's name."},
    "state": {"type": "string", "enum": [str(state) for state in State]},
    "attempts": {"type": "integer", "minimum": 0, "description": "Attempts started so far."},
    "max_attempts": {"type": "integer", "description": "Attempts it may have in all."},
    "progress": {
        "type": ["number", "null"],
        "minimum": 0,
        "maximum": 100,
        "description": "Percent done, as the task last reported it (`null`: never reported).",
    },
    "result": {"description": "The task's return value, once it succeeded (any JSON)."},
    "error": {"type": ["string", "null"], "description": "How its last attempt failed."},
    "created_at": {"type": "string", "format": "date-time"},
    "due_at": {
        "type": "string",
        "format": "date-time",
        "description": "When it may start: its countdown or ETA, or its next attempt's "
        "backoff (the job waits in the ledger until then, and no broker holds it).",
    },
    "started_at": {**NULLABLE_TIME, "description": "When its last attempt started."},
    "finished_at": NULLABLE_TIME,
    "cancel_requested_at": {
        **NULLABLE_TIME,
        "description": "When someone asked the running job to stop.",
    },
    "tenant": {
        "type": ["string", "null"],
        "description": "Whose job it is (`null`: no tenant's); always the token's tenant.",
    },
    "queue": {
        "type": ["string", "null"],
        "description": "The queue its message goes to, as Celery's routes chose it when it "
        "was enqueued (`null`: a job kept from before proj recorded it).",
    },
    "priority": {
        "type": "integer",
        "minimum": 0,
        "maximum": 9,
        "description": "Its Celery priority (0 when it has none): on RabbitMQ a higher one "
        "is delivered first, on Redis a lower one.",
    },
    "canvas_id": {
        "type": ["string", "null"],
        "description": "The canvas (chain, group, chord) it is a step of (`null`: none).",
    },
    "parents": {
        "type": "array",
        "items": {"type": "string"},
        "description": "The jobs it waits for (their results come first in its arguments).",
    },
    "children": {
        "type": "array",
        "items": {"type": "string"},
        "description": "The steps its success releases.",
    },
    "error_callbacks": {
        "type": "array",
        "items": {"type": "string"},
        "description": "The `link_error` callbacks that run if it fails for good.",
    },
}

JOB_EXAMPLE = {
    "id": "5f0c2d8e-4b1a-4f7e-9a57-2f3b8c1d9e60",
    "name": "proj.tasks.generate_report",
    "state": "running",
    "attempts": 1,
    "max_attempts": 4,
    "progress": 40.0,
    "result": None,
    "error": None,
    "created_at": "2025-01-31T09:30:00.120000+00:00",
    "due_at": "2025-01-31T09:30:00.120000+00:00",
    "started_at": "2025-01-31T09:30:00.480000+00:00",
    "finished_at": None,
    "cancel_requested_at": None,
    "tenant": None,
    "queue": "celery",
    "priority": 0,
    "canvas_id": None,
    "parents": [],
    "children": [],
    "error_callbacks": [],
}


QUEUE_FIELDS: dict[str, Any] = {
    "name": {"type": "string"},
    "paused": {"type": "boolean"},
    "paused_at": {**NULLABLE_TIME, "description": "When it was paused (`null`: it is not)."},
    "paused_by": {
        "type": ["string", "null"],
        "description": "Who paused it, as the audit trail names actors (`null`: it is not).",
    },
}

AUDIT_FIELDS: dict[str, Any] = {
    "id": {"type": "integer", "minimum": 1, "description": "Newest first is highest first."},
    "at": {"type": "string", "format": "date-time"},
    "actor": {
        "type": "string",
        "description": "Who: `token:<name>`, `account:<email>`, `cli` (a command) or "
        "`anonymous` (a failed sign-in).",
    },
    "action": {"type": "string", "enum": [str(action) for action in Action]},
    "target": {
        "type": ["string", "null"],
        "description": "What it was done to: a job's id, how many jobs, a token's name, an "
        "account's email.",
    },
    "tenant": {
        "type": ["string", "null"],
        "description": "The acting token's tenant; always the reading token's.",
    },
    "address": {
        "type": ["string", "null"],
        "description": "The client's address (`null`: a command).",
    },
    "detail": {
        "type": ["object", "null"],
        "description": "What else there is to say: a cancelled job's state before (`was`), "
        "a bulk action's counts and filter, a new token's role and tenant.",
    },
}

AUDIT_EXAMPLE = {
    "id": 1042,
    "at": "2025-01-31T09:31:12.480000+00:00",
    "actor": "token:deploy-bot",
    "action": "job.cancel",
    "target": "5f0c2d8e-4b1a-4f7e-9a57-2f3b8c1d9e60",
    "tenant": None,
    "address": "203.0.113.7",
    "detail": {"was": "queued"},
}


def page_parameters(item: str, items: str, cursor: dict[str, Any]) -> list[dict[str, Any]]:
    """A paged list's ``limit`` (how many ``items``) and ``before`` (the
    previous page's last ``item``, its id as ``cursor`` describes it)."""
    return [
        {
            "name": "limit",
            "in": "query",
            "description": f"{items.capitalize()} on a page.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT,
            },
        },
        {
            "name": "before",
            "in": "query",
            "description": f"The id of the previous page's last {item}.",
            "schema": cursor,
        },
    ]


def _object(description: str, fields: dict[str, Any], **more: Any) -> dict[str, Any]:
    """An object schema in which every field is always present (null when unknown)."""
    return {
        "type": "object",
        "description": description,
        "properties": fields,
        "required": list(fields),
        **more,
    }


def schemas() -> dict[str, Any]:
    """The schemas the job API's and the metrics endpoint's paths refer to."""
    attempt_fields = {
        "attempt": {
            "type": "integer",
            "minimum": 0,
            "description": "Which attempt it was (0: the job failed before any began).",
        },
        "outcome": {
            "type": "string",
            "description": "What it left the job in: `retrying`, or `failed`.",
        },
        "error": {"type": ["string", "null"]},
        "traceback": {"type": ["string", "null"]},
        "worker": {"type": ["string", "null"], "description": "`hostname:pid` that ran it."},
        "started_at": NULLABLE_TIME,
        "finished_at": {"type": "string", "format": "date-time"},
    }
    errors = {
        "type": "array",
        "items": schema("JobAttempt"),
        "description": "Each attempt that ended in an error, oldest first.",
    }
    message = {"type": "string", "description": "What happens next."}
    error_fields = {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "fields": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "What is wrong with each field or parameter named.",
        },
    }
    return {
        "Job": _object(
            "A background job, as the ledger has it.", JOB_FIELDS, examples=[JOB_EXAMPLE]
        ),
        "JobDetail": _object(
            "A job, with the attempts that failed.", {**JOB_FIELDS, "errors": errors}
        ),
        "JobAttempt": _object("An attempt of a job that ended in an error.", attempt_fields),
        "JobCancelling": _object(
            "A running job asked to stop.", {**JOB_FIELDS, "message": message}
        ),
        "JobPage": _object(
            "A page of jobs, newest first.",
            {
                "jobs": {"type": "array", "items": schema("Job")},
                "next": {
                    "type": ["string", "null"],
                    "format": "uri-reference",
                    "description": "The next page's URL (`null`: this is the last page).",
                },
            },
        ),
        "Queue": _object("A queue: whether it is paused, by whom and since when.", QUEUE_FIELDS),
        "QueueList": _object(
            "The queues that are paused or have jobs waiting, by name.",
            {
                "queues": {
                    "type": "array",
                    "items": _object(
                        "A queue, and how many jobs wait in it.",
                        {
                            **QUEUE_FIELDS,
                            "waiting": {
                                "type": "integer",
                                "minimum": 0,
                                "description": "The token's tenant's jobs queued or retrying "
                                "in it (a paused queue's wait until it is resumed).",
                            },
                        },
                    ),
                }
            },
        ),
        "AuditEntry": _object(
            "An action of the audit trail.", AUDIT_FIELDS, examples=[AUDIT_EXAMPLE]
        ),
        "AuditPage": _object(
            "A page of the audit trail, newest first.",
            {
                "entries": {"type": "array", "items": schema("AuditEntry")},
                "next": {
                    "type": ["string", "null"],
                    "format": "uri-reference",
                    "description": "The next page's URL (`null`: this is the last page).",
                },
            },
        ),
        "Error": _object(
            "What went wrong: `code` is stable, for programs (`not_found`, `invalid_query`, "
            "`conflict`, `unauthorized`…); `message` tells a person what to do.",
            {"error": _object("The error.", error_fields) | {"required": ["code", "message"]}},
            examples=[{"error": {"code": "not_found", "message": "no job with id 42"}}],
        ),
    }


def responses() -> dict[str, Any]:
    """The refusals every guarded route may answer."""
    challenge = '`Bearer realm="proj"`, with `error="invalid_token"` for an unknown token.'
    return {
        "Unauthorized": json_body(
            "No token, or one that is unknown, revoked or expired.",
            schema("Error"),
            **{"WWW-Authenticate": challenge},
        ),
        "Forbidden": error("The token's role may not do this (a viewer's token only reads)."),
    }


def security_schemes() -> dict[str, Any]:
    """The bearer token scheme of :mod:`proj.jobs.auth`."""
    return {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "proj token",
            "description": (
                "An API token (made by `proj.jobs.auth.add_token`, or the `token add` command "
                "of `proj.jobs.cli`), sent as `Authorization: Bearer <token>`. A viewer's "
                "token reads (GET); an "
                "operator's also writes. A token made for a tenant sees that tenant's data "
                "only: another tenant's is answered 404, as if it did not exist."
            ),
        }
    }


def _job_id() -> dict[str, Any]:
    return {
        "name": "job_id",
        "in": "path",
        "required": True,
        "description": "The job's id.",
        "schema": {"type": "string"},
    }


def job_api_paths(prefix: str) -> dict[str, Any]:
    """The paths of ``proj.jobs.api.blueprint`` mounted at ``prefix``."""
    read, write = requires(Role.VIEWER), requires(Role.OPERATOR)
    unknown = error("No job with this id that the token may see.")
    refused = {"401": response("Unauthorized"), "403": response("Forbidden")}
    return {
        prefix: {
            "get": {
                "operationId": "list_jobs",
                "tags": ["jobs"],
                "summary": "List jobs, newest first",
                "description": "Follow `next` for the following page.",
                "security": read,
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "description": "Only jobs in this state.",
                        "schema": {"type": "string", "enum": [str(state) for state in State]},
                    },
                    {
                        "name": "canvas",
                        "in": "query",
                        "description": "Only the steps of this canvas (`canvas_id`).",
                        "schema": {"type": "string"},
                    },
                    *page_parameters("job", "jobs", {"type": "string"}),
                ],
                "responses": {
                    "200": json_body("A page of jobs.", schema("JobPage")),
                    "400": error("`state` or `limit` is not valid (`invalid_query`)."),
                    "401": response("Unauthorized"),
                    "404": error("`before` names no job the token may see."),
                },
            }
        },
        f"{prefix}/{{job_id}}": {
            "get": {
                "operationId": "get_job",
                "tags": ["jobs"],
                "summary": "A job, with its failed attempts",
                "security": read,
                "parameters": [_job_id()],
                "responses": {
                    "200": json_body("The job.", schema("JobDetail")),
                    "401": response("Unauthorized"),
                    "404": unknown,
                },
            }
        },
        f"{prefix}/{{job_id}}/retry": {
            "post": {
                "operationId": "retry_job",
                "tags": ["jobs"],
                "summary": "Run a failed job again",
                "description": "Its attempts start over.",
                "security": write,
                "parameters": [_job_id()],
                "responses": {
                    "202": json_body("Queued again.", schema("Job")),
                    **refused,
                    "404": unknown,
                    "409": error(
                        "The job is not failed, or is a message no worker could read (`conflict`)."
                    ),
                },
            }
        },
        f"{prefix}/{{job_id}}/cancel": {
            "post": {
                "operationId": "cancel_job",
                "tags": ["jobs"],
                "summary": "Cancel a job",
                "description": (
                    "A waiting job is cancelled at once and never runs (200). A running one "
                    "is asked to stop (202): it ends `cancelled` at its next check "
                    "(`check_cancelled()` or a progress report); one that never checks "
                    "finishes as it would have."
                ),
                "security": write,
                "parameters": [_job_id()],
                "responses": {
                    "200": json_body("Cancelled.", schema("Job")),
                    "202": json_body("Asked to stop.", schema("JobCancelling")),
                    **refused,
                    "404": unknown,
                    "409": error("The job has finished already (`conflict`)."),
                },
            }
        },
    }


def queue_paths(prefix: str) -> dict[str, Any]:
    """The paths of ``proj.jobs.queues_api.blueprint`` mounted at ``prefix``."""
    name = {
        "name": "queue",
        "in": "path",
        "required": True,
        "description": "The queue's name, as Celery's routes name it.",
        "schema": {"type": "string", "maxLength": 255},
    }
    refused = {
        "400": error("The name cannot be a queue's (`invalid_queue`)."),
        "401": response("Unauthorized"),
        "403": error(
            "The token is a viewer's, or a tenant's: a paused queue holds every tenant's jobs."
        ),
    }

    def change(verb: str, summary: str, description: str) -> dict[str, Any]:
        return {
            "post": {
                "operationId": f"{verb}_queue",
                "tags": ["queues"],
                "summary": summary,
                "description": description,
                "security": requires(Role.OPERATOR),
                "parameters": [name],
                "responses": {"200": json_body("The queue now.", schema("Queue")), **refused},
            }
        }

    return {
        prefix: {
            "get": {
                "operationId": "list_queues",
                "tags": ["queues"],
                "summary": "The queues paused or with jobs waiting",
                "security": requires(Role.VIEWER),
                "responses": {
                    "200": json_body("The queues, by name.", schema("QueueList")),
                    "401": response("Unauthorized"),
                },
            }
        },
        f"{prefix}/{{queue}}/pause": change(
            "pause",
            "Pause a queue",
            "Its jobs wait in the ledger until it is resumed: none is published, and a "
            "worker hands back any it receives, unrun. Kept in the database (restarts "
            "change nothing) and recorded in the audit trail. A paused queue stays as it "
            "was (who paused it, and when).",
        ),
        f"{prefix}/{{queue}}/resume": change(
            "resume",
            "Resume a paused queue",
            "What waits is published, due time first. Recorded in the audit trail.",
        ),
    }


def audit_paths(prefix: str) -> dict[str, Any]:
    """The path of ``proj.jobs.audit_api.blueprint`` mounted at ``prefix``."""
    return {
        prefix: {
            "get": {
                "operationId": "list_audit",
                "tags": ["audit"],
                "summary": "The audit trail, newest first",
                "description": (
                    "Each retry, cancel, bulk action, console sign-in (failed ones too), "
                    "sign-out and token or account change: who, what, to what, when, from "
                    "where. A tenant's token reads what its tenant's tokens did; a token "
                    "with no tenant, the rest. Kept as long as finished jobs are. Follow "
                    "`next` for the following page."
                ),
                "security": requires(Role.VIEWER),
                "parameters": [
                    *page_parameters(
                        "entry", "entries", {"type": "integer", "minimum": 1, "maximum": MAX_ID}
                    ),
                ],
                "responses": {
                    "200": json_body("A page of entries.", schema("AuditPage")),
                    "400": error("`limit` or `before` is not valid (`invalid_query`)."),
                    "401": response("Unauthorized"),
                },
            }
        }
    }


def metrics_paths(prefix: str) -> dict[str, Any]:
    """The path of ``proj.jobs.metrics_api.blueprint`` mounted at ``prefix``."""
    return {
        prefix: {
            "get": {
                "operationId": "scrape",
                "tags": ["metrics"],
                "summary": "Metrics for Prometheus",
                "description": (
                    "The counters and histograms of every process, and gauges read from the "
                    "job ledger at each scrape, in Prometheus's text format 0.0.4. They count "
                    "every tenant's jobs, so the token must be one made without a tenant."
                ),
                "security": requires(Role.VIEWER),
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                    },
                    "401": response("Unauthorized"),
                    "403": error("The token is a tenant's."),
                },
            }
        }
    }


def describe(
    *,
    title: str,
    version: str,
    paths: dict[str, Any],
    description: str = "",
    tags: list[dict[str, str]] | None = None,
    own_schemas: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``paths``, with this module's schemas,
    responses and token scheme and the application's ``own_schemas``; each
    operation needs a token unless its ``security`` says otherwise. ``tags``
    come first, then this module's (only those some operation uses)."""
    used = {tag for item in paths.values() for op in item.values() for tag in op.get("tags", ())}
    given = list(tags or ())
    named = {tag["name"] for tag in given}
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    return {
        "openapi": OPENAPI_VERSION,
        "info": info,
        "tags": given + [tag for tag in TAGS if tag["name"] in used - named],
        "security": [{SECURITY_SCHEME: []}],
        "paths": paths,
        "components": {
            "schemas": {**schemas(), **(own_schemas or {})},
            "responses": responses(),
            "securitySchemes": security_schemes(),
        },
    }
