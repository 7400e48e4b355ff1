"""``.. openapi::``: a page made from an OpenAPI 3.1 document at build time,
so the HTTP API reference is the document the application serves.

::

    .. openapi:: proj.web.openapi:document

The argument names a function that returns the document. The page gets a
section per tag, in the document's order, with a section per operation
(its token, parameters, body and responses), then a section per schema
(its fields, and its example). Every schema has a label,
``http-api-schema-<name>`` in lower case, to refer to it from elsewhere.
Descriptions are CommonMark in the document; the little of it they use
(paragraphs and code spans) is the same in reStructuredText but for the
code spans' backticks, which are doubled here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

METHODS = ("get", "put", "post", "patch", "delete")
CODE_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
ROLES = {"viewer": "a viewer's (or an operator's)", "operator": "an operator's"}


def rst(text: str) -> str:
    """CommonMark ``text`` as reStructuredText, on one line."""
    return " ".join(CODE_SPAN.sub(r"``\1``", text).split())


def paragraphs(text: str) -> list[str]:
    """CommonMark ``text``'s paragraphs, each on one line, blank lines between."""
    lines: list[str] = []
    for paragraph in text.strip().split("\n\n"):
        lines += [rst(paragraph), ""]
    return lines


def heading(title: str, underline: str) -> list[str]:
    return [title, underline * len(title), ""]


def label(name: str) -> str:
    return f"http-api-schema-{name.lower()}"


class Document:
    """One OpenAPI document, with its references followed."""

    def __init__(self, described: dict[str, Any]) -> None:
        self.described = described

    def follow(self, item: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in item:
            found: Any = self.described
            for part in item["$ref"].removeprefix("#/").split("/"):
                found = found[part]
            item = found
        return item

    def type_of(self, schema: dict[str, Any]) -> str:
        """What ``schema`` accepts, in a few words with links to named schemas."""
        if "$ref" in schema:
            name = schema["$ref"].rpartition("/")[2]
            return f":ref:`{name} <{label(name)}>`"
        if "const" in schema:
            return f"``{json.dumps(schema['const'])}``"
        if "enum" in schema:
            return "one of " + ", ".join(f"``{value}``" for value in schema["enum"])
        kinds = schema.get("type")
        if kinds is None:
            return "any JSON value"
        words = []
        for kind in [kinds] if isinstance(kinds, str) else kinds:
            if kind == "array":
                words.append(f"array of {self.type_of(schema.get('items', {}))}")
            elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
                words.append(f"object of {self.type_of(schema['additionalProperties'])}")
            else:
                words.append(str(kind))
        said = " or ".join(words)
        qualities = ", ".join(self.qualities(schema))
        return f"{said} ({qualities})" if qualities else said

    @staticmethod
    def qualities(schema: dict[str, Any]) -> Iterator[str]:
        if "format" in schema:
            yield schema["format"]
        if "minimum" in schema and "maximum" in schema:
            yield f"from {schema['minimum']} to {schema['maximum']}"
        elif "minimum" in schema:
            yield f"at least {schema['minimum']}"
        if "maxLength" in schema:
            yield f"at most {schema['maxLength']} characters"
        if "default" in schema:
            yield f"default {schema['default']}"

    def body_of(self, answer: dict[str, Any]) -> str:
        content = answer.get("content", {})
        return "; ".join(
            f"{self.type_of(media['schema'])}"
            + ("" if kind == "application/json" else f" ({kind})")
            for kind, media in content.items()
        )

    def operations(self, tag: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for path, item in self.described["paths"].items():
            for method in METHODS:
                if method in item and tag in item[method].get("tags", ()):
                    yield path, method, item[method]

    def token(self, operation: dict[str, Any]) -> str:
        security = operation.get("security", self.described.get("security", []))
        if not security:
            return "none"
        roles = [
            role for requirement in security for needs in requirement.values() for role in needs
        ]
        return " or ".join(ROLES.get(role, f"``{role}``") for role in roles) or "any"


def table(header: list[str], rows: list[list[str]], widths: str = "auto") -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0] or ' '}")
        lines += [f"     - {cell or ' '}" for cell in row[1:]]
    return [*lines, ""]


def operation_lines(doc: Document, path: str, method: str, operation: dict[str, Any]) -> list[str]:
    lines = heading(f"``{method.upper()} {path}``", "~")
    if "summary" in operation:
        lines += [rst(operation["summary"]) + ".", ""]
    lines += paragraphs(operation.get("description", ""))
    lines += [f":Token: {doc.token(operation)}"]
    if "requestBody" in operation:
        lines += [f":Body: {doc.body_of(doc.follow(operation['requestBody']))}"]
    lines.append("")
    parameters = [doc.follow(parameter) for parameter in operation.get("parameters", [])]
    if parameters:
        rows = [
            [
                f"``{p['name']}``",
                p["in"],
                doc.type_of(p["schema"]),
                "yes" if p.get("required") else "no",
                rst(p.get("description", "")),
            ]
            for p in parameters
        ]
        lines += table(["Parameter", "In", "Type", "Required", "Description"], rows)
    rows = []
    for status, answer in operation["responses"].items():
        answer = doc.follow(answer)
        said = rst(answer["description"])
        if answer.get("headers"):
            said += " Headers: " + ", ".join(f"``{name}``" for name in answer["headers"]) + "."
        rows.append(["other" if status == "default" else status, said, doc.body_of(answer)])
    return lines + table(["Status", "Answer", "Body"], rows, widths="1 5 3")


def fields(doc: Document, schema: dict[str, Any], within: str = "") -> Iterator[list[str]]:
    """A row per field of ``schema``, and per field of an object inside it."""
    required = set(schema.get("required", ()))
    for field, described in schema.get("properties", {}).items():
        name = f"{within}{field}"
        yield [
            f"``{name}``",
            doc.type_of(described),
            "yes" if field in required else "no",
            rst(described.get("description", "")),
        ]
        yield from fields(doc, described, f"{name}.")


def extended(doc: Document, name: str, schema: dict[str, Any]) -> str | None:
    """The schema whose name begins ``name`` and whose every field ``schema``
    has, if any (``Job`` for ``JobDetail``)."""
    mine = schema.get("properties", {})
    for other, theirs in doc.described["components"]["schemas"].items():
        shared = theirs.get("properties", {})
        smaller = name.startswith(other) and 0 < len(shared) < len(mine)
        if smaller and all(mine.get(field) == value for field, value in shared.items()):
            return str(other)
    return None


def schema_lines(doc: Document, name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f".. _{label(name)}:", "", *heading(name, "~")]
    lines += paragraphs(schema.get("description", ""))
    base = extended(doc, name, schema)
    if base is not None:
        lines += [f"The fields of :ref:`{base} <{label(base)}>`, and:", ""]
        inherited = doc.described["components"]["schemas"][base]["properties"]
        schema = {
            **schema,
            "properties": {
                field: value
                for field, value in schema["properties"].items()
                if field not in inherited
            },
        }
    rows = list(fields(doc, schema))
    if rows:
        lines += table(["Field", "Type", "Required", "Description"], rows)
    for example in schema.get("examples", [])[:1]:
        body = json.dumps(example, indent=2, ensure_ascii=False).splitlines()
        lines += ["For example:", "", ".. code-block:: json", "", *(f"   {line}" for line in body)]
        lines.append("")
    return lines


def page_lines(described: dict[str, Any]) -> list[str]:
    """The reStructuredText of the page for ``described``."""
    doc = Document(described)
    lines = paragraphs(described["info"].get("description", ""))
    lines += [f"OpenAPI {described['openapi']}; version {described['info']['version']}.", ""]
    schemes = described.get("components", {}).get("securitySchemes", {})
    if schemes:
        lines += heading("Tokens", "-")
        for scheme in schemes.values():
            lines += paragraphs(scheme.get("description", ""))
    for tag in described.get("tags", []):
        lines += heading(tag["name"].capitalize(), "-")
        lines += paragraphs(tag.get("description", ""))
        for path, method, operation in doc.operations(tag["name"]):
            lines += operation_lines(doc, path, method, operation)
    lines += heading("Schemas", "-")
    for name, schema in described.get("components", {}).get("schemas", {}).items():
        lines += schema_lines(doc, name, schema)
    return lines


def load(spec: str) -> Callable[[], dict[str, Any]]:
    module, _, name = spec.partition(":")
    found: Callable[[], dict[str, Any]] = getattr(importlib.import_module(module), name)
    return found


class OpenApi(SphinxDirective):
    """The directive: one argument, ``module:function``."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        make = load(self.arguments[0])
        # The page is rebuilt when the module that writes the document changes.
        self.env.note_dependency(inspect.getfile(make))
        text = "\n".join(page_lines(make()))
        return self.parse_text_to_nodes(text, allow_section_headings=True)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("openapi", OpenApi)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
