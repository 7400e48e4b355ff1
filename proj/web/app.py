"""The Flask application factory (``flask --app proj.web run``)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from flask import Flask, Response, current_app, jsonify, url_for
from sqlalchemy import text

from proj.config import Settings, current_settings
from proj.db import db
from proj.jobs import Jobs, engine_options
from proj.jobs import api as jobs_api
from proj.web.api import api
from proj.web.errors import error_response, register_error_handlers

HEALTH_TIMEOUT = 2.0
"""Seconds the health check waits for the broker to answer."""


def create_app(settings: Settings | None = None, celery_app: Celery | None = None) -> Flask:
    """The web application for ``settings`` (default: the environment's).

    Views enqueue through ``celery_app`` (default: ``proj.celery.app``), whose
    broker the health check asks.
    """
    if celery_app is None:
        from proj.celery import app as proj_app

        celery_app = proj_app
    settings = settings or current_settings()
    jobs = Jobs.of(celery_app)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Flask("proj.web")
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_content_length,
        SQLALCHEMY_DATABASE_URI=jobs.database_url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(jobs.database_url, settings.web_pool_size),
    )
    app.extensions["proj.celery"] = celery_app
    db.init_app(app)
    jobs.init_app(app, db)
    app.register_blueprint(api)
    app.register_blueprint(jobs_api.blueprint, url_prefix="/api/jobs")
    register_error_handlers(app)
    app.add_url_rule("/", view_func=index)
    app.add_url_rule("/healthz", view_func=healthz)
    return app


def index() -> Response:
    """Where to start."""
    return jsonify(
        name="proj",
        endpoints={
            "sign up": f"POST {url_for('api.create_user')}",
            "user": "GET /api/users/<id>",
            "invoice": f"POST {url_for('api.create_invoice')}",
            "charge": "POST /api/invoices/<id>/charge",
            "health": f"GET {url_for('healthz')}",
        },
    )


def healthz() -> Any:
    """200 when the database and the broker answer; 503 naming the one that does not.

    Each is asked once, for at most :data:`HEALTH_TIMEOUT` seconds: a health
    check answers promptly rather than waiting for a server to come back.
    """
    problems: dict[str, str] = {}
    try:
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
    except Exception as exc:
        problems["database"] = f"not answering: {exc.__class__.__name__}"
    celery_app: Celery = current_app.extensions["proj.celery"]
    try:
        with celery_app.connection_for_write(
            connect_timeout=HEALTH_TIMEOUT, transport_options=_timeouts(celery_app)
        ) as connection:
            connection.ensure_connection(max_retries=0)
    except Exception as exc:
        problems["broker"] = f"not answering: {exc.__class__.__name__}"
    if problems:
        names = " and ".join(sorted(problems))
        return error_response(503, "unavailable", f"{names} not answering", problems)
    return jsonify(status="ok", database="ok", broker="ok")


def _timeouts(celery_app: Celery) -> dict[str, float]:
    # Redis clients wait forever by default on a server that accepts the
    # connection but never answers; AMQP's connect timeout covers its handshake.
    if str(celery_app.conf.broker_url or "").startswith(("redis:", "rediss:")):
        return {"socket_timeout": HEALTH_TIMEOUT, "socket_connect_timeout": HEALTH_TIMEOUT}
    return {}
