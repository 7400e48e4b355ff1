"""The OpenAPI document served at ``/api/openapi.json`` is the API: every
route under the API's prefixes is in it with its methods and parameters,
everything in it is a route, each guarded operation refuses a request
without a token (and a viewer's, for writes), and real answers of every
operation match its schemas, every field of them documented."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from werkzeug.routing import Rule

from proj.db import worker_engine
from proj.jobs.ledger import record_failure
from proj.web.openapi import document

API = ("/api/", "/healthz", "/metrics")
"""Where the HTTP API is. Not in it: ``/`` (a pointer for people), the
console's HTML pages under ``/dashboard``, and static files."""
NOT_API = ("/dashboard/", "/static/", "/favicon")
IMPLIED = frozenset({"HEAD", "OPTIONS"})
"""Methods Flask adds to every route, which OpenAPI leaves out."""
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
URI = "urn:proj:openapi"

DOCUMENT = document()
FORMATS = FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _is_a_time(value: object) -> bool:
    # jsonschema checks date-time only with a package proj does not need.
    return not isinstance(value, str) or datetime.fromisoformat(value).tzinfo is not None


def closed(described: Any) -> Any:
    """``described`` with every object schema's fields closed: an answer with
    a field the document does not name fails (clients may still accept more)."""
    if isinstance(described, dict):
        found = {key: closed(value) for key, value in described.items()}
        if "properties" in found and "additionalProperties" not in found:
            found["additionalProperties"] = False
        return found
    if isinstance(described, list):
        return [closed(value) for value in described]
    return described


REGISTRY = Registry().with_resource(URI, Resource(closed(DOCUMENT), DRAFT202012))


def assert_valid(value: Any, schema: dict[str, Any], what: str) -> None:
    validator = Draft202012Validator(schema, registry=REGISTRY, format_checker=FORMATS)
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(value)]
    assert not problems, f"{what} does not match the document: {problems}"


def rooted(schema: Any) -> Any:
    """``schema`` (closed) with its references pointing into the document."""
    return _into_document(closed(schema))


def _into_document(schema: Any) -> Any:
    if isinstance(schema, dict):
        found = {key: _into_document(value) for key, value in schema.items()}
        if str(found.get("$ref", "")).startswith("#/"):
            found["$ref"] = URI + found["$ref"]
        return found
    if isinstance(schema, list):
        return [_into_document(value) for value in schema]
    return schema


def resolved(item: dict[str, Any]) -> dict[str, Any]:
    """A response or parameter, its ``$ref`` followed."""
    while "$ref" in item:
        found: Any = DOCUMENT
        for part in item["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        item = found
    return item


ARGUMENT = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")
"""A variable part of a Werkzeug rule: ``<converter(options):name>``."""
PARAMETER_TYPES = {"int": "integer", "default": "string", "string": "string"}


def openapi_path(rule: Rule) -> str:
    """The rule's path in OpenAPI's template syntax (``/api/jobs/{job_id}``)."""
    return ARGUMENT.sub(r"{\2}", rule.rule)


def path_types(rule: Rule) -> dict[str, str]:
    """Each variable of the rule → the JSON type of its values."""
    return {
        name: PARAMETER_TYPES[converter or "default"]
        for converter, name in ARGUMENT.findall(rule.rule)
    }


def api_rules(app: Flask) -> list[Rule]:
    """The app's rules that are part of the HTTP API (every other is named in :data:`NOT_API`)."""
    rules = list(app.url_map.iter_rules())
    unplaced = [r.rule for r in rules if r.rule != "/" and not r.rule.startswith((*API, *NOT_API))]
    assert not unplaced, f"say whether these routes are part of the HTTP API: {unplaced}"
    return [rule for rule in rules if rule.rule.startswith(API)]


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """(path, METHOD) → the document's operation."""
    return {
        (path, method.upper()): operation
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def test_every_route_is_described_and_everything_described_is_a_route(app: Flask) -> None:
    routes = {
        (openapi_path(rule), method)
        for rule in api_rules(app)
        for method in sorted((rule.methods or set()) - IMPLIED)
    }
    described = set(operations())
    assert sorted(routes - described) == [], "routes the document leaves out"
    assert sorted(described - routes) == [], "operations that are no route"


def test_path_parameters_are_the_routes_own(app: Flask) -> None:
    for rule in api_rules(app):
        for method in (rule.methods or set()) - IMPLIED:
            operation = operations()[(openapi_path(rule), method)]
            declared = {
                found["name"]: found
                for found in map(resolved, operation.get("parameters", []))
                if found["in"] == "path"
            }
            types = path_types(rule)
            assert set(declared) == set(types) == set(rule.arguments), rule.rule
            for name, parameter in declared.items():
                assert parameter["required"] is True, (rule.rule, name)
                assert parameter["schema"]["type"] == types[name], (rule.rule, name)


def test_operations_are_named_after_their_views(app: Flask) -> None:
    for rule in api_rules(app):
        for method in (rule.methods or set()) - IMPLIED:
            operation = operations()[(openapi_path(rule), method)]
            assert operation["operationId"] == rule.endpoint.rpartition(".")[2], rule.rule


def filled(path: str, operation: dict[str, Any]) -> str:
    """``path`` with a value of the right type in each parameter."""
    for parameter in map(resolved, operation.get("parameters", [])):
        if parameter["in"] == "path":
            value = "1" if parameter["schema"]["type"] == "integer" else "no-such-job"
            path = path.replace(f"{{{parameter['name']}}}", value)
    return path


def needs(operation: dict[str, Any]) -> list[str] | None:
    """The roles an operation needs (None: no token)."""
    security = operation.get("security", DOCUMENT["security"])
    return None if security == [] else list(security[0]["apiToken"])


def test_each_operation_asks_for_the_token_it_says(
    app: Flask, make_token: Callable[..., str]
) -> None:
    """Without a token a guarded operation is a 401 (documented, with its
    challenge), an open one is answered; with a viewer's token a write is a
    403 and a read is let through."""
    anonymous = app.test_client()
    viewer = app.test_client()
    viewer.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(app, 'viewer')}"
    for (path, method), operation in operations().items():
        url = filled(path, operation)
        refused = anonymous.open(url, method=method, json={})
        if needs(operation) is None:
            assert refused.status_code != 401, url
            continue
        assert refused.status_code == 401, url
        assert "401" in operation["responses"], url
        assert refused.headers["WWW-Authenticate"].startswith("Bearer"), url
        as_viewer = viewer.open(url, method=method, json={})
        if needs(operation) == ["operator"]:
            assert as_viewer.status_code == 403, url
            assert "403" in operation["responses"], url
        else:
            assert needs(operation) == ["viewer"], url
            assert as_viewer.status_code not in (401, 403), url


class Described:
    """A test client whose every exchange is checked against the document:
    the request body against the operation's, the answer's status, media
    type, headers and body against one of its documented responses."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def __call__(
        self,
        method: str,
        path: str,
        status: int,
        *,
        json: Any = None,
        query: str = "",
        data: str | None = None,
        content_type: str | None = None,
        **arguments: object,
    ) -> Any:
        operation = DOCUMENT["paths"][path][method.lower()]
        if json is not None and status < 400:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert_valid(json, rooted(body), f"the body sent to {method} {path}")
        url = path.format(**arguments) + (f"?{query}" if query else "")
        answer = self.client.open(
            url, method=method, json=json, data=data, content_type=content_type
        )
        assert answer.status_code == status, (url, answer.get_data(as_text=True)[:500])
        documented = operation["responses"].get(str(status)) or operation["responses"]["default"]
        documented = resolved(documented)
        for header in documented.get("headers", {}):
            assert header in answer.headers, f"{method} {url} {status}: no {header} header"
        (media, content), *_ = documented["content"].items()
        base, *parameters = [part.strip() for part in media.split(";")]
        assert answer.mimetype == base, (url, answer.content_type)
        assert set(parameters) <= {p.strip() for p in answer.content_type.split(";")}, url
        if base != "application/json":
            return answer.get_data(as_text=True)
        found = answer.get_json()
        assert_valid(found, rooted(content["schema"]), f"{method} {url}'s {status}")
        return found


@pytest.fixture
def described(client: FlaskClient) -> Described:
    return Described(client)


def test_sign_up_invoice_charge_and_the_jobs_they_make(described: Described) -> None:
    email = f"openapi-{uuid.uuid4().hex}@example.com"
    user = described("POST", "/api/users", 201, json={"email": email})
    described("GET", "/api/users/{user_id}", 200, user_id=user["id"])
    described("POST", "/api/users", 409, json={"email": email})
    invoice = described(
        "POST", "/api/invoices", 201, json={"user_id": user["id"], "amount_cents": 1250}
    )
    described("GET", "/api/invoices/{invoice_id}", 200, invoice_id=invoice["id"])
    charge = described("POST", "/api/invoices/{invoice_id}/charge", 202, invoice_id=invoice["id"])
    report = described("POST", "/api/reports", 202, json={"user_id": user["id"]})

    described("GET", "/api/jobs/{job_id}", 200, job_id=report["job_id"])
    described("POST", "/api/jobs/{job_id}/retry", 409, job_id=report["job_id"])
    described("POST", "/api/jobs/{job_id}/cancel", 200, job_id=report["job_id"])
    described("POST", "/api/jobs/{job_id}/cancel", 409, job_id=report["job_id"])

    record_failure(worker_engine(), job_id=charge["job_id"], name="x", error="refused")
    failed = described("GET", "/api/jobs/{job_id}", 200, job_id=charge["job_id"])
    assert [attempt["error"] for attempt in failed["errors"]] == ["refused"]
    described("POST", "/api/jobs/{job_id}/retry", 202, job_id=charge["job_id"])

    page = described("GET", "/api/jobs", 200, query="limit=1")
    assert page["next"] is not None
    described("GET", "/api/jobs", 200, query="state=cancelled&limit=500")


def test_refusals_are_the_documented_errors(described: Described, app: Flask) -> None:
    described("GET", "/api/users/{user_id}", 404, user_id=2**40)
    described("GET", "/api/invoices/{invoice_id}", 404, invoice_id=1_000_000)
    described("POST", "/api/invoices/{invoice_id}/charge", 404, invoice_id=1_000_000)
    described("POST", "/api/users", 400, json={"email": "not an address"})
    described("POST", "/api/users", 400, data="{", content_type="application/json")
    described("POST", "/api/invoices", 400, json={"user_id": 1})
    described("POST", "/api/reports", 415, data="user_id=1")
    described("GET", "/api/jobs", 400, query="state=lost")
    described("GET", "/api/jobs", 400, query="limit=0")
    described("GET", "/api/jobs", 404, query="before=no-such-job")
    described("GET", "/api/jobs/{job_id}", 404, job_id="no-such-job")
    described("POST", "/api/jobs/{job_id}/cancel", 404, job_id="no-such-job")
    # Not listed for the operation, but answered in the same shape: the default.
    too_long = "x" * (app.config["MAX_CONTENT_LENGTH"] + 1)
    described("POST", "/api/users", 413, data=too_long, content_type="application/json")


def test_health_metrics_and_the_document_itself(described: Described, app: Flask) -> None:
    described("GET", "/healthz", 200)
    assert "proj_ledger_up 1.0" in described("GET", "/metrics", 200)
    served = app.test_client().get("/api/openapi.json")  # no token
    assert served.status_code == 200
    assert served.get_json() == DOCUMENT
    described("GET", "/api/openapi.json", 200)
