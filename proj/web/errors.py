"""Every error the API returns is JSON: ``{"error": {"code", "message", "fields"?}}``."""

from __future__ import annotations

import logging

from flask import Flask, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from proj.jobs.http import json_error

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as it is."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields


error_response = json_error


def register_error_handlers(app: Flask) -> None:
    """Answer every error, Flask's own included, in the API's JSON shape."""

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> tuple[Response, int]:
        return error_response(error.status, error.code, error.message, error.fields)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int, list[tuple[str, str]]]:
        code = (error.name or "error").lower().replace(" ", "_")
        response, status = error_response(error.code or 500, code, error.description or code)
        # Keep what the error says besides its HTML body (Allow on a 405, ...).
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        return response, status, headers

    @app.errorhandler(DBAPIError)
    def database_error(error: DBAPIError) -> tuple[Response, int]:
        logger.exception("database error")
        if error.connection_invalidated or isinstance(error, OperationalError):
            return error_response(
                503, "database_unavailable", "the database is not answering; try again shortly"
            )
        return internal_error()

    @app.errorhandler(PoolTimeout)
    def no_connection(error: PoolTimeout) -> tuple[Response, int]:
        logger.warning("no database connection free: %s", error)
        return error_response(
            503, "database_unavailable", "the database is not answering; try again shortly"
        )

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error")
        return internal_error()


def internal_error() -> tuple[Response, int]:
    return error_response(500, "internal_error", "the server failed to handle this request")
