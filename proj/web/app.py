"""The Flask application factory (``flask --app proj.web run``)."""

from __future__ import annotations

import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from flask import Flask, Response, current_app, jsonify, url_for
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool
from werkzeug.middleware.proxy_fix import ProxyFix

from proj.config import Settings, current_settings
from proj.db import db
from proj.jobs import (
    ConfigurationError,
    Jobs,
    audit_api,
    auth,
    console,
    deadlines,
    engine_options,
    queues_api,
)
from proj.jobs import api as jobs_api
from proj.jobs import metrics_api as jobs_metrics
from proj.web.api import api
from proj.web.errors import error_response, register_error_handlers
from proj.web.openapi import DOCUMENT_PATH, openapi_document

HEALTH_TIMEOUT = 2.0
"""Seconds the health check waits for the broker to answer."""


def create_app(settings: Settings | None = None, celery_app: Celery | None = None) -> Flask:
    """The web application for ``settings`` (default: the environment's).

    Views enqueue through ``celery_app`` (default: ``proj.celery.app``), whose
    broker the health check asks. With ``PROJ_TRUSTED_PROXIES``, the client
    address is taken from ``X-Forwarded-For`` as that many proxies set it.
    """
    if celery_app is None:
        from proj.celery import app as proj_app

        celery_app = proj_app
    settings = settings or current_settings()
    jobs = Jobs.of(celery_app)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Flask("proj.web")
    app.config.update(
        SECRET_KEY=secret_key(settings),
        SESSION_COOKIE_SECURE=settings.cookie_secure,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_HTTPONLY=True,
        PROJ_LOGIN_RATE_LIMIT=settings.login_rate_limit,
        PROJ_SESSION_IDLE_TIMEOUT=settings.session_idle_timeout,
        PROJ_SESSION_LIFETIME=settings.session_lifetime,
        PROJ_RATELIMIT_STORAGE_URI=settings.ratelimit_storage_uri,
        MAX_CONTENT_LENGTH=settings.max_content_length,
        SQLALCHEMY_DATABASE_URI=jobs.database_url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(
            jobs.database_url,
            settings.web_pool_size,
            statement_timeout=settings.web_statement_timeout,
            lock_timeout=jobs.settings.lock_timeout,
            answer_within=settings.web_answer_within,
        ),
    )
    app.extensions["proj.celery"] = celery_app
    # One budget for every wait of a request (token look-up, ping, reconnect,
    # its own queries), not one for each.
    deadlines.per_request(app, settings.web_answer_within)
    # The health check's own connections: never one of a request's, and a
    # check left waiting on a silent server holds none of the pool's.
    app.extensions["proj.health_engine"] = create_engine(
        jobs.database_url, poolclass=NullPool, **_connect_args(jobs.database_url)
    )
    db.init_app(app)
    jobs.init_app(app, db)
    app.register_blueprint(api)
    auth.require_token_under(app, "/api/")
    app.register_blueprint(jobs_api.blueprint, url_prefix="/api/jobs")
    app.register_blueprint(queues_api.blueprint, url_prefix="/api/queues")
    app.register_blueprint(audit_api.blueprint, url_prefix="/api/audit")
    app.register_blueprint(jobs_metrics.blueprint, url_prefix="/metrics")
    app.register_blueprint(console.blueprint, url_prefix="/dashboard")
    register_error_handlers(app)
    app.add_url_rule("/", view_func=index)
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/favicon.ico", view_func=favicon)
    app.add_url_rule(DOCUMENT_PATH, view_func=openapi_document)  # no token: see its module
    if settings.trusted_proxies:
        # Only the addresses the trusted proxies appended: what a client
        # wrote in the header itself is never the client address.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]
    return app


WEAK_SECRETS = frozenset({"", "dev", "change-me", "changeme", "secret"})
MIN_SECRET = 16


def secret_key(settings: Settings) -> str:
    """``SECRET_KEY``; on the embedded setup, when it is not set, a random key
    kept in the data folder, readable by its owner only. A default or short
    one is refused everywhere, and a missing one outside the embedded setup:
    it signs the console's sessions and CSRF tokens."""
    key = settings.secret_key
    if key and key not in WEAK_SECRETS and len(key) >= MIN_SECRET:
        return key
    if key or not settings.embedded:
        raise ConfigurationError(
            f"set SECRET_KEY to a random value of at least {MIN_SECRET} characters "
            '(python -c "import secrets; print(secrets.token_urlsafe(32))"); '
            "it signs the console's sessions"
        )
    kept = settings.data_dir / "secret-key"
    try:
        # Made once, whole, readable by its owner only; a process starting at
        # the same moment reads the one that won.
        made = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _refuse_if_others_may_read(kept)
    else:
        with os.fdopen(made, "w") as out:
            out.write(secrets.token_urlsafe(32))
    for _ in range(50):
        key = kept.read_text().strip()
        if key:
            return key
        time.sleep(0.01)  # the process that made it is still writing
    raise ConfigurationError(f"{kept} is empty: delete it, or set SECRET_KEY")


def _refuse_if_others_may_read(kept: Path) -> None:
    found = kept.stat()
    if found.st_uid != os.getuid():
        raise ConfigurationError(
            f"{kept} belongs to another user (uid {found.st_uid}): delete it, or set SECRET_KEY"
        )
    if found.st_mode & 0o077:
        raise ConfigurationError(
            f"{kept} may be read by others (mode {stat.S_IMODE(found.st_mode):o}): "
            f"chmod 600 it if nobody else read it, else delete it (sessions signed "
            "with it end)"
        )


def _connect_args(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": max(1, int(HEALTH_TIMEOUT))}}
    return {}


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
            "description": f"GET {url_for('openapi_document')}",
        },
    )


def favicon() -> Response:
    """The console's icon, for the browsers that ask every site for
    ``/favicon.ico`` (the console's pages link it themselves)."""
    return console.blueprint.send_static_file("favicon.svg")


def healthz() -> Any:
    """200 when the database and the broker answer; 503 naming the one that does not.

    Both are asked at once, each on a connection of its own, and the answer
    comes within :data:`HEALTH_TIMEOUT` seconds whatever they do: a server
    that accepts connections and then says nothing counts as not answering.
    """
    celery_app: Celery = current_app.extensions["proj.celery"]
    engine: Engine = current_app.extensions["proj.health_engine"]
    checks = {
        "database": lambda: _database_answers(engine),
        "broker": lambda: _broker_answers(celery_app),
    }
    problems = {
        name: problem for name, problem in _ask_at_once(checks, HEALTH_TIMEOUT).items() if problem
    }
    if problems:
        names = " and ".join(sorted(problems))
        return error_response(503, "unavailable", f"{names} not answering", problems)
    return jsonify(status="ok", database="ok", broker="ok")


def _ask_at_once(checks: dict[str, Callable[[], None]], timeout: float) -> dict[str, str | None]:
    """Run each check in a thread of its own; what went wrong with each (None:
    it answered), counting one still running after ``timeout`` as silent. A
    silent check's thread is left to end when its connection does."""
    found: dict[str, str | None] = {}

    def ask(name: str, check: Callable[[], None]) -> None:
        try:
            check()
            found[name] = None
        except Exception as exc:
            found[name] = f"not answering: {exc.__class__.__name__}"

    threads = [
        threading.Thread(target=ask, args=item, name=f"healthz-{item[0]}", daemon=True)
        for item in checks.items()
    ]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    silent = f"not answering: no answer in {timeout:g} s"
    return {name: found.get(name, silent) for name in checks}


def _database_answers(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _broker_answers(celery_app: Celery) -> None:
    with celery_app.connection_for_write(
        connect_timeout=HEALTH_TIMEOUT, transport_options=_timeouts(celery_app)
    ) as connection:
        connection.ensure_connection(max_retries=0)


def _timeouts(celery_app: Celery) -> dict[str, float]:
    # Redis clients wait forever by default on a server that accepts the
    # connection but never answers; AMQP's connect timeout covers its handshake.
    if str(celery_app.conf.broker_url or "").startswith(("redis:", "rediss:")):
        return {"socket_timeout": HEALTH_TIMEOUT, "socket_connect_timeout": HEALTH_TIMEOUT}
    return {}
