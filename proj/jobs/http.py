"""What every proj endpoint shares: the one JSON error shape it answers
with, ``{"error": {"code", "message", "fields"?}}``, and how it reads a
whole number sent as text."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify


def json_error(
    status: int, code: str, message: str, fields: dict[str, str] | None = None
) -> tuple[Response, int]:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return jsonify(error=body), status


def whole_number(text: str) -> int | None:
    """The whole number ``text`` spells in ASCII digits (``"050"`` is 50), or
    None: never an error, whatever the text. ``int()`` alone would take
    ``" 5"``, ``"+5"`` and ``"5_0"``; ``str.isdigit()`` alone takes ``"²"``,
    which ``int()`` refuses, as it refuses more than 4,300 digits."""
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        return None
