"""The OpenAPI document is sound on its own: the fields OpenAPI 3.1 defines,
references that resolve, schemas that are JSON Schema 2020-12 with examples
that match them, unique operation ids, declared tags and schemes, and path
templates whose variables are declared. (Whether it matches the routes and
their answers is ``tests/integration/test_openapi.py``'s question.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proj.jobs import openapi
from proj.jobs.auth import Role
from proj.web.openapi import document

DOCUMENT = document()
URI = "urn:proj:openapi"
REGISTRY = Registry().with_resource(URI, Resource(DOCUMENT, DRAFT202012))

# The fields OpenAPI 3.1 defines for each object used here.
TOP = {
    "openapi", "info", "jsonSchemaDialect", "servers", "paths", "webhooks", "components",
    "security", "tags", "externalDocs",
}  # fmt: skip
OPERATION = {
    "tags", "summary", "description", "externalDocs", "operationId", "parameters",
    "requestBody", "responses", "callbacks", "deprecated", "security", "servers",
}  # fmt: skip
PARAMETER = {
    "name", "in", "description", "required", "deprecated", "allowEmptyValue", "style",
    "explode", "allowReserved", "schema", "example", "examples", "content",
}  # fmt: skip
RESPONSE = {"description", "headers", "content", "links"}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
STATUS = re.compile(r"^(default|[1-5](\d\d|XX))$")


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOCUMENT["paths"].items():
        assert set(item) <= METHODS | {"summary", "description", "parameters"}, path
        for method in set(item) & METHODS:
            yield path, method, item[method]


def followed(item: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in item:
        assert item["$ref"].startswith("#/"), item["$ref"]
        found: Any = DOCUMENT
        for part in item["$ref"][2:].split("/"):
            found = found[part]
        item = found
    return item


def schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema the document holds, named by where it is."""
    for name, found in DOCUMENT["components"]["schemas"].items():
        yield f"components.schemas.{name}", found
    for path, method, operation in operations():
        where = f"{method.upper()} {path}"
        for parameter in map(followed, operation.get("parameters", [])):
            yield f"{where} parameter {parameter['name']}", parameter["schema"]
        for media, content in operation.get("requestBody", {}).get("content", {}).items():
            yield f"{where} body {media}", content["schema"]
        for status, answer in operation["responses"].items():
            answer = followed(answer)
            for media, content in answer.get("content", {}).items():
                yield f"{where} {status} {media}", content["schema"]
            for header, described in answer.get("headers", {}).items():
                yield f"{where} {status} header {header}", described["schema"]


def references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            yield value["$ref"]
        for inner in value.values():
            yield from references(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from references(inner)


def test_the_document_is_openapi_3_1_and_plain_json() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    assert set(DOCUMENT) <= TOP
    assert isinstance(DOCUMENT["info"]["title"], str)
    assert isinstance(DOCUMENT["info"]["version"], str)
    assert json.loads(json.dumps(DOCUMENT)) == DOCUMENT


def test_every_reference_resolves() -> None:
    found = list(references(DOCUMENT))
    assert found
    for reference in found:
        assert followed({"$ref": reference}), reference


@pytest.mark.parametrize(
    ("where", "schema"), [pytest.param(*found, id=found[0]) for found in schemas()]
)
def test_every_schema_is_json_schema_2020_12(where: str, schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(schema)
    # Its references resolve, and the examples given match it.
    rooted = json.loads(json.dumps(schema).replace('"#/', f'"{URI}#/'))
    validator = Draft202012Validator(rooted, registry=REGISTRY)
    for example in schema.get("examples", []):
        validator.validate(example)


def test_operations() -> None:
    """Unique ids; known fields; responses with descriptions and schemas;
    every variable of the path declared as a required path parameter and no
    other; tags declared; security naming a declared scheme and known roles."""
    ids = [operation["operationId"] for _, _, operation in operations()]
    assert len(ids) == len(set(ids))
    tags = [tag["name"] for tag in DOCUMENT["tags"]]
    assert len(tags) == len(set(tags))
    schemes = DOCUMENT["components"]["securitySchemes"]
    roles = {str(role) for role in Role}
    for path, method, operation in operations():
        where = f"{method.upper()} {path}"
        assert set(operation) <= OPERATION, where
        assert operation["responses"], where
        for status, answer in operation["responses"].items():
            answer = followed(answer)
            assert STATUS.match(status) and set(answer) <= RESPONSE, (where, status)
            assert answer["description"], (where, status)
        parameters = [followed(p) for p in operation.get("parameters", [])]
        for parameter in parameters:
            assert set(parameter) <= PARAMETER, (where, parameter)
            assert parameter["in"] in {"query", "header", "path", "cookie"}, where
        in_path = {p["name"] for p in parameters if p["in"] == "path" and p["required"] is True}
        assert in_path == set(re.findall(r"{([^}]+)}", path)), where
        assert set(operation.get("tags", [])) <= set(tags), where
        for requirement in operation.get("security", DOCUMENT["security"]):
            for scheme, needed in requirement.items():
                assert scheme in schemes and set(needed) <= roles, where


def test_the_library_describes_the_job_api_wherever_it_is_mounted() -> None:
    paths = openapi.job_api_paths("/background")
    assert sorted(paths) == [
        "/background",
        "/background/{job_id}",
        "/background/{job_id}/cancel",
        "/background/{job_id}/retry",
    ]
    made = openapi.describe(title="Shop", version="2", paths=paths)
    assert [tag["name"] for tag in made["tags"]] == ["jobs"]
    assert set(references(made)) <= {
        f"#/components/{kind}/{name}"
        for kind in ("schemas", "responses")
        for name in made["components"][kind]
    }
