"""GET /healthz: 200 on a working stack, a prompt 503 naming the part that is down."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import celery
import pytest
from flask.testing import FlaskClient
from sqlalchemy import make_url

import proj.celery
from proj.config import Settings, load_settings
from proj.db import db as web_db
from proj.jobs import Jobs, auth
from proj.jobs.engine import PING_AFTER_IDLE
from proj.jobs.testing.faults import TcpProxy
from proj.web import create_app

if TYPE_CHECKING:
    from conftest import Stack

CLOSED_BROKERS = ["amqp://guest:guest@127.0.0.1:1//", "redis://127.0.0.1:1/0"]
CLOSED_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:1/x"
BUDGET = 2.0
"""``PROJ_WEB_ANSWER_WITHIN`` in the silent-database request test, seconds."""


def ask_health(
    settings: Settings, *, before: Callable[[], object] | None = None
) -> tuple[int, dict[str, Any]]:
    """GET /healthz on a web app whose database and broker are those of
    ``settings`` (after a first GET and ``before()``, if given).

    Fails, rather than hangs, if the answer takes more than 30 s.
    """
    current = celery.current_app._get_current_object()
    try:
        flask_app = create_app(settings, proj.celery.make_celery(settings))
    finally:
        current.set_current()  # a new Celery app makes itself current in this thread
    if before is not None:
        assert flask_app.test_client().get("/healthz").status_code == 200
        before()
    answers: list[tuple[int, dict[str, Any]]] = []

    def ask() -> None:
        response = flask_app.test_client().get("/healthz")
        answers.append((response.status_code, response.get_json()))

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout=30)
    with flask_app.app_context():
        web_db.engine.dispose()
    assert answers, "the health check did not answer in 30 s"
    return answers[0]


def unavailable(answer: tuple[int, dict[str, Any]]) -> dict[str, str]:
    """The fields of a 503 answer, its shape checked."""
    status, body = answer
    assert status == 503, body
    error = body["error"]
    assert error["code"] == "unavailable"
    for name in error["fields"]:
        assert name in error["message"]
    fields: dict[str, str] = error["fields"]
    return fields


def test_healthy_stack(client: FlaskClient) -> None:
    """On a working stack the health check answers 200 and says both parts are ok."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "broker": "ok"}


@pytest.mark.parametrize("broker_url", CLOSED_BROKERS, ids=["amqp", "redis"])
def test_broker_refusing_connections(stack: Stack, broker_url: str) -> None:
    """A broker whose port is closed makes the health check 503 naming the broker only."""
    fields = unavailable(ask_health(replace(stack.settings, broker_url=broker_url)))
    assert list(fields) == ["broker"]
    assert "OperationalError" in fields["broker"]


def test_database_refusing_connections(stack: Stack) -> None:
    """A database whose port is closed makes the health check 503 naming the database only."""
    fields = unavailable(
        ask_health(
            replace(stack.settings, jobs=replace(stack.settings.jobs, database_url=CLOSED_DATABASE))
        )
    )
    assert list(fields) == ["database"]


@pytest.mark.parametrize("scheme", ["amqp", "redis"])
def test_silent_broker(tmp_path: Path, scheme: str) -> None:
    """A broker that accepts connections but never answers still gets a prompt 503."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        url = {
            "amqp": f"amqp://guest:guest@127.0.0.1:{port}//",
            "redis": f"redis://127.0.0.1:{port}/0",
        }[scheme]
        settings = replace(load_settings({"PROJ_DATA_DIR": str(tmp_path)}), broker_url=url)
        assert list(unavailable(ask_health(settings))) == ["broker"]


@contextmanager
def behind_a_proxy(stack: Stack) -> Iterator[tuple[TcpProxy, Settings]]:
    """The stack's settings with its PostgreSQL behind a proxy the test may
    blackhole (skipped on SQLite)."""
    if not stack.on_postgres:
        pytest.skip("a database server to put behind the proxy: this stack runs SQLite")
    url = make_url(stack.settings.database_url)
    with TcpProxy((str(url.host), int(url.port or 5432))) as proxy:
        silent = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        yield proxy, replace(stack.settings, jobs=replace(stack.settings.jobs, database_url=silent))


def test_silent_database_behind_a_blackholed_proxy(stack: Stack) -> None:
    """PostgreSQL behind a proxy: the health check answers 200; then the proxy
    keeps every connection open and forwards nothing, and the next check still
    answers, 503 naming the database only (a check on a connection kept from
    the first would wait for the server forever)."""
    with behind_a_proxy(stack) as (proxy, settings):
        fields = unavailable(ask_health(settings, before=proxy.blackhole))
        proxy.restore()
    assert list(fields) == ["database"]


def test_a_request_answers_within_one_budget_when_the_database_goes_silent(
    stack: Stack,
) -> None:
    """A sign-up with ``PROJ_WEB_ANSWER_WITHIN=2`` while PostgreSQL, behind a
    proxy, goes silent: the token look-up's ping, a reconnect and the
    request's own queries all draw on one budget, so it answers 503 within
    the budget and a second, not a deadline for each of them."""
    with behind_a_proxy(stack) as (proxy, through_proxy):
        settings = replace(through_proxy, web_answer_within=BUDGET)
        current = celery.current_app._get_current_object()
        own = proj.celery.make_celery(settings)  # its sign-ups enqueue through the proxy too
        own.set_current()
        try:
            flask_app = create_app(settings, own)
        finally:
            current.set_current()
        with flask_app.app_context():
            token = auth.add_token(web_db.session, f"budget-{uuid.uuid4().hex[:8]}", "operator")
            web_db.session.commit()
        client = flask_app.test_client()
        headers = {"Authorization": f"Bearer {token}"}

        def sign_up() -> int:
            body = {"email": f"{uuid.uuid4().hex[:10]}@example.com"}
            return client.post("/api/users", json=body, headers=headers).status_code

        own.set_current()
        try:
            assert sign_up() == 201
            time.sleep(PING_AFTER_IDLE + 0.2)  # the next checkout pings the pooled connection
            proxy.blackhole()
            began = time.monotonic()
            status = sign_up()
            took = time.monotonic() - began
            proxy.restore()
        finally:
            current.set_current()
            with flask_app.app_context():
                web_db.engine.dispose()
            Jobs.of(own).dispose()
    assert status == 503
    assert took < BUDGET + 1.0, f"answered after {took:.1f} s"
