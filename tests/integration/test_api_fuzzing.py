"""No input reaches a 500, nor an answer the OpenAPI document does not
describe: Schemathesis fuzzes every operation of the document against the
stack's application, in process through WSGI, with an operator's token of a
tenant of the module's own.

Two runs, each checked with every Schemathesis check (a server error, a
status, media type, header or body the document does not list, an invalid
request accepted, a valid one refused, a guarded operation that opens
without its token, ...):

- ``test_api``: the requests Schemathesis makes up from the document, valid
  and not, as many per operation as the Hypothesis profile of
  ``tests/conftest.py`` says, the same on every run;
- ``test_hostile_values``: each of :data:`HOSTILE_IN_URLS` in every path and
  query parameter, and each of :data:`HOSTILE_IN_JSON` in every field of
  every body, the inputs that broke parsers here before.

The document is :func:`proj.web.openapi.document`, which
``test_openapi.py`` checks is the one served at ``/api/openapi.json``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from celery import Celery
from flask import Flask

from proj.db import db as web_db
from proj.jobs import auth
from proj.web import create_app
from proj.web.openapi import document

if TYPE_CHECKING:
    from conftest import Stack

DOCUMENT = document()


class Served:
    """The stack's application and an operator's token for it, while the
    module's tests run. The schema is loaded at import, before there is a
    stack, so it sends its requests (its checks' own too) here."""

    app: Flask | None = None
    token: str | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        assert self.app is not None, "no stack is being served"
        return self.app(environ, start_response)


SERVED = Served()

ACCEPTED_OR_NO_SUCH_USER = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""What a valid request may be answered when its body names a user: what
Schemathesis accepts, and a 400 (``invalid_fields``) for a user that does not
exist, which no schema can rule out."""
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            # Query arguments the document does not name are ignored, as most
            # HTTP APIs do, not refused.
            "allow-extra-parameters": False,
            # The token is the run's own (see operator()); the checks that
            # need a request without it make one.
            "with-security-parameters": False,
        },
        "operations": [
            {
                "include-operation-id": ["create_invoice", "create_report"],
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ACCEPTED_OR_NO_SUCH_USER}
                },
            }
        ],
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
schema.app = SERVED


@pytest.fixture(scope="module")
def served(stack: Stack, celery_app: Celery) -> Iterator[Served]:
    """:data:`SERVED`, with the stack's application and an operator's token."""
    flask_app = create_app(stack.settings, celery_app)
    flask_app.testing = True
    with flask_app.app_context():
        # A tenant of the module's own: a monthly report covers the users the
        # fuzzer made, not every user the session's earlier tests left.
        tenant = f"fuzzing-{uuid.uuid4().hex[:8]}"
        SERVED.token = auth.add_token(web_db.session, "schemathesis", "operator", tenant)
        web_db.session.commit()
    SERVED.app = flask_app
    yield SERVED
    SERVED.app = SERVED.token = None
    with flask_app.app_context():
        web_db.engine.dispose()


def operator(served: Served) -> dict[str, str]:
    """The headers that send the operator's token."""
    return {"Authorization": f"Bearer {served.token}"}


@schema.parametrize()
def test_api(case: schemathesis.Case, served: Served) -> None:
    case.call_and_validate(headers=operator(served))


HOSTILE_IN_URLS = (
    "\x00",  # PostgreSQL refuses a NUL in text
    "nul\x00@example.com",
    "line\r\nbreak@example.com",  # a header broken in two
    "²",  # a digit to str.isdigit(), not to int()
    "١٢",  # digits to int() too, but not ASCII ones
    "1" * 5000,  # more digits than int() reads
    "x" * 300 + "@example.com",  # longer than any id or name column
    "%_\\@example.com",  # LIKE's wildcards, and its escape
)
"""Text that broke a parser or a query here before, as a path segment or a query argument."""
HOSTILE_IN_JSON: tuple[object, ...] = (
    *HOSTILE_IN_URLS,
    "\ud800@example.com",  # a lone surrogate: JSON spells it, UTF-8 has none
    -1,
    2**63,  # beyond PostgreSQL's bigint
)
"""What else a JSON body can carry."""
PLACEHOLDERS = {"integer": 1, "string": "placeholder@example.com"}
"""A valid value of each type, for the parameters and fields not under test."""


def body_schema(operation: dict[str, Any]) -> dict[str, Any] | None:
    """The operation's JSON body schema, its reference followed."""
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if body is None:
        return None
    found: dict[str, Any] = DOCUMENT
    for part in body["schema"]["$ref"].removeprefix("#/").split("/"):
        found = found[part]
    return found


def hostile_cases(path: str, method: str) -> Iterator[schemathesis.Case]:
    """The operation's requests with one parameter or body field hostile each."""
    operation = schema[path][method]
    described = DOCUMENT["paths"][path][method.lower()]
    parameters = described.get("parameters", [])
    in_path = {
        p["name"]: PLACEHOLDERS[p["schema"]["type"]] for p in parameters if p["in"] == "path"
    }
    fields = body_schema(described)
    body = (
        {name: PLACEHOLDERS[fields["properties"][name]["type"]] for name in fields["required"]}
        if fields
        else None
    )

    def case(**changes: Any) -> schemathesis.Case:
        sent: dict[str, Any] = {"path_parameters": in_path}
        if body is not None:
            sent.update(body=body, media_type="application/json")
        return operation.Case(**{**sent, **changes})

    for value in HOSTILE_IN_URLS:
        for parameter in parameters:
            name = parameter["name"]
            if parameter["in"] == "path":
                yield case(path_parameters={**in_path, name: value})
            else:
                yield case(query={name: value})
    for value in HOSTILE_IN_JSON if fields else ():
        for name in fields["properties"]:
            yield case(body={**body, name: value})


@pytest.mark.parametrize(
    ("method", "path"),
    [(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item],
)
def test_hostile_values(served: Served, method: str, path: str) -> None:
    """Every hostile value in every parameter and body field of the operation."""
    for case in hostile_cases(path, method):
        case.call_and_validate(headers=operator(served))
