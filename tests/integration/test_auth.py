"""API authentication on the real stacks, over HTTP with Flask's test client.

Every endpoint under ``/api`` (read from the app's URL map, so a new one is
covered without touching this file) answers 401 to a request without a
valid bearer token and 403 to a viewer's write, and such a request changes
no row; a viewer reads them all. Tokens and passwords are stored as hashes
only, and logged nowhere; ``SECRET_KEY`` is refused when weak outside the
embedded setup, which keeps a random one of its own.
"""

from __future__ import annotations

import logging
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import celery
import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import select, text
from werkzeug.test import TestResponse

from proj.celery import make_celery
from proj.config import load_settings
from proj.db import db as web_db
from proj.db import session_scope, worker_engine
from proj.jobs import ConfigurationError, Job, Jobs, auth, shared_task
from proj.jobs.auth import SAFE_METHODS
from proj.jobs.ledger import record_failure
from proj.models import Invoice, User
from proj.web import create_app
from proj.web.app import secret_key
from proj.web.openapi import DOCUMENT_PATH

if TYPE_CHECKING:
    from conftest import Stack

MakeToken = Callable[..., str]
"""conftest's ``make_token`` fixture: ``make_token(app, role="operator")``, a new token."""

COUNTED = ("users", "invoices", "jobs", "job_attempts", "job_queue_pauses", "proj_audit")
QUEUE = "tests-auth"
"""The queue the queue API's requests name."""
KNOWN = {
    ("POST", "/api/users"),
    ("GET", "/api/users/<int:user_id>"),
    ("POST", "/api/invoices"),
    ("GET", "/api/invoices/<int:invoice_id>"),
    ("POST", "/api/invoices/<int:invoice_id>/charge"),
    ("POST", "/api/reports"),
    ("GET", "/api/jobs"),
    ("GET", "/api/jobs/<job_id>"),
    ("POST", "/api/jobs/<job_id>/retry"),
    ("POST", "/api/jobs/<job_id>/cancel"),
}
"""The endpoints there were when this was written: the URL map must still have them."""


@shared_task(name="tests.auth.noop")
def noop() -> None:
    """A job that waits in the ledger (nobody runs it here)."""


def new_email() -> str:
    return f"auth-{uuid.uuid4().hex}@example.com"


@dataclass
class Existing:
    """Rows the requests name: a user, an open invoice of theirs, a queued job
    and a failed one."""

    user_id: int
    invoice_id: int
    queued_job: str
    failed_job: str

    def values(self, endpoint: str) -> dict[str, Any]:
        """Every URL argument an ``/api`` rule may have, for ``endpoint``:
        retrying is asked of the failed job, the rest of the queued one."""
        job = self.failed_job if endpoint == "jobs.retry_job" else self.queued_job
        return {
            "user_id": self.user_id,
            "invoice_id": self.invoice_id,
            "job_id": job,
            "queue": QUEUE,  # paused, then resumed: no other test's
        }

    def body(self, endpoint: str) -> dict[str, Any]:
        """A body the endpoint accepts (so a write let through would change rows)."""
        bodies: dict[str, Callable[[], dict[str, Any]]] = {
            "api.create_user": lambda: {"email": new_email()},
            "api.create_invoice": lambda: {"user_id": self.user_id, "amount_cents": 4200},
            "api.create_report": lambda: {"user_id": self.user_id},
            "api.create_monthly_report": lambda: {"month": "2026-11"},
        }
        return bodies.get(endpoint, dict)()


@dataclass
class Endpoint:
    method: str
    rule: str
    endpoint: str
    url: str

    @property
    def writes(self) -> bool:
        return self.method not in SAFE_METHODS

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


def api_endpoints(app: Flask, existing: Existing) -> list[Endpoint]:
    """Every method of every rule under ``/api`` but the API's description
    (public: it says no more than the docs), its URL built with ``existing``'s ids."""
    urls = app.url_map.bind("localhost")
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api") or rule.rule == DOCUMENT_PATH:
            continue
        values = existing.values(rule.endpoint)
        unknown = set(rule.arguments) - set(values)
        assert not unknown, f"{rule.rule}: add an existing id for {unknown} to Existing.values"
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            url = urls.build(rule.endpoint, values, method=method)
            found.append(Endpoint(method, rule.rule, rule.endpoint, url))
    return found


def send(
    app: Flask, existing: Existing, endpoint: Endpoint, authorization: str | None
) -> TestResponse:
    """``endpoint`` asked by a client that sends ``authorization`` (nothing if None)."""
    headers = {} if authorization is None else {"Authorization": authorization}
    body = existing.body(endpoint.endpoint) if endpoint.writes else None
    return app.test_client().open(endpoint.url, method=endpoint.method, json=body, headers=headers)


def rows() -> dict[str, Any]:
    """What a refused request must leave as it was: the row counts of
    :data:`COUNTED`, every job's state, attempts and cancel request, and
    every invoice's status."""
    with session_scope() as session:
        counts = {name: session.scalar(text(f"SELECT count(*) FROM {name}")) for name in COUNTED}
        jobs = session.execute(select(Job.id, Job.state, Job.attempts, Job.cancel_requested_at))
        invoices = session.execute(select(Invoice.id, Invoice.status))
        return {
            "counts": counts,
            "jobs": {job_id: tuple(rest) for job_id, *rest in jobs},
            "invoices": {invoice_id: status for invoice_id, status in invoices},
        }


@pytest.fixture
def existing(app: Flask, purged: Celery) -> Iterator[Existing]:
    """:class:`Existing`, made new; the messages published meanwhile are purged after."""
    with session_scope() as session:
        user = User(email=new_email())
        session.add(user)
        session.flush()
        invoice = Invoice(user_id=user.id, amount_cents=1999)
        session.add(invoice)
        session.flush()
        user_id, invoice_id = user.id, invoice.id
    queued = noop.apply_async_on_commit()
    failed = str(uuid.uuid4())
    record_failure(worker_engine(), job_id=failed, name=noop.name, error="failed for the test")
    yield Existing(user_id, invoice_id, queued, failed)
    purged.control.purge()


def error_of(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    assert response.is_json, response.get_data(as_text=True)
    error: dict[str, Any] = response.get_json()["error"]
    assert error["message"]
    return error


def test_the_url_map_lists_every_known_endpoint(app: Flask, existing: Existing) -> None:
    """The endpoints the other tests walk include every one there was when
    they were written, reading and writing (a broken enumeration would make
    them pass on nothing)."""
    found = {(endpoint.method, endpoint.rule) for endpoint in api_endpoints(app, existing)}
    assert found >= KNOWN


def revoke(app: Flask, token: str) -> str:
    """``token``, revoked."""
    with app.app_context():
        found = auth.token_for(web_db.session, token)
        assert found is not None
        assert auth.revoke_token(web_db.session, found.name)
        web_db.session.commit()
    return token


REFUSED: dict[str, Callable[[Flask, MakeToken], str | None]] = {
    "none": lambda app, make_token: None,
    "basic": lambda app, make_token: "Basic dXNlcjpwYXNzd29yZA==",
    "basic-with-a-valid-token": lambda app, make_token: f"Basic {make_token(app)}",
    "bearer-alone": lambda app, make_token: "Bearer",
    "bearer-blank": lambda app, make_token: "Bearer   ",
    "unknown-token": lambda app, make_token: f"Bearer {auth.TOKEN_PREFIX}{uuid.uuid4().hex}",
    "valid-token-altered": lambda app, make_token: f"Bearer {make_token(app)}x",
    "revoked-token": lambda app, make_token: f"Bearer {revoke(app, make_token(app))}",
}
"""``Authorization`` headers (None: none) that carry no live token."""


@pytest.mark.parametrize("authorization", list(REFUSED.values()), ids=list(REFUSED))
def test_no_valid_token_is_401_and_changes_nothing(
    app: Flask,
    existing: Existing,
    make_token: MakeToken,
    authorization: Callable[[Flask, MakeToken], str | None],
) -> None:
    """Every endpoint, reading or writing, answers 401 with the JSON error
    and a ``WWW-Authenticate: Bearer`` challenge; no row changes."""
    header = authorization(app, make_token)
    before = rows()
    for endpoint in api_endpoints(app, existing):
        response = send(app, existing, endpoint, header)
        assert error_of(response, 401)["code"] == "unauthorized", endpoint
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer"), endpoint
    assert rows() == before


def test_a_viewer_may_not_write(app: Flask, existing: Existing, make_token: MakeToken) -> None:
    """A viewer's token on every writing endpoint: 403 ``forbidden``; no row changes."""
    viewer = f"Bearer {make_token(app, auth.Role.VIEWER)}"
    writing = [endpoint for endpoint in api_endpoints(app, existing) if endpoint.writes]
    assert writing
    before = rows()
    for endpoint in writing:
        assert error_of(send(app, existing, endpoint, viewer), 403)["code"] == "forbidden", endpoint
    assert rows() == before


def test_a_viewer_reads_every_reading_endpoint(
    app: Flask, existing: Existing, make_token: MakeToken
) -> None:
    """A viewer's token on every reading endpoint: 2xx with a JSON answer."""
    viewer = f"Bearer {make_token(app, auth.Role.VIEWER)}"
    reading = [endpoint for endpoint in api_endpoints(app, existing) if not endpoint.writes]
    assert reading
    for endpoint in reading:
        response = send(app, existing, endpoint, viewer)
        assert 200 <= response.status_code < 300, (str(endpoint), response.get_json())
        assert response.is_json, endpoint


def test_an_operator_s_writes_change_rows(
    app: Flask, existing: Existing, make_token: MakeToken
) -> None:
    """The writes the tests above refuse, sent with an operator's token: each
    answers 2xx and changes rows (so a refusal that let one through would
    show)."""
    operator = f"Bearer {make_token(app, auth.Role.OPERATOR)}"
    for endpoint in api_endpoints(app, existing):
        if not endpoint.writes:
            continue
        before = rows()
        response = send(app, existing, endpoint, operator)
        assert 200 <= response.status_code < 300, (str(endpoint), response.get_json())
        assert rows() != before, f"{endpoint} changed nothing"


def test_a_revoked_token_is_refused_from_then_on(app: Flask, make_token: MakeToken) -> None:
    """A token answers 200 until it is revoked, then 401 (``invalid_token``)."""
    token = make_token(app, auth.Role.VIEWER)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    assert client.get("/api/jobs?limit=1").status_code == 200
    revoke(app, token)
    refused = client.get("/api/jobs?limit=1")
    assert error_of(refused, 401)["code"] == "unauthorized"
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]


def test_without_a_token_no_route_under_api_is_told(app: Flask, make_token: MakeToken) -> None:
    """An unknown path or a method a route does not take answers 401 to a
    request without a token (not the 404 or 405 that would tell the routes),
    and the 404 or 405 to one with a token."""
    probes = [("GET", "/api/nothing-here", 404), ("DELETE", "/api/users", 405)]
    anonymous = app.test_client()
    for method, path, _ in probes:
        error_of(anonymous.open(path, method=method), 401)
    operator = app.test_client()
    operator.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(app, auth.Role.OPERATOR)}"
    for method, path, status in probes:
        assert operator.open(path, method=method).status_code == status, path


def test_tokens_and_passwords_are_stored_as_hashes_only(app: Flask, make_token: MakeToken) -> None:
    """No column of ``proj_api_tokens`` holds the token (nor its random
    part), none of ``proj_accounts`` the password; the token still opens the
    API and the password the account."""
    token = make_token(app, auth.Role.VIEWER)
    email, password = new_email(), f"pw-{uuid.uuid4().hex}"
    with app.app_context():
        auth.add_account(web_db.session, email, password, auth.Role.OPERATOR)
        web_db.session.commit()
        tokens = web_db.session.execute(text("SELECT * FROM proj_api_tokens")).all()
        accounts = web_db.session.execute(text("SELECT * FROM proj_accounts")).all()
        opened = auth.authenticate(web_db.session, email, password)
        opens = opened.email if opened is not None else None
        refused = auth.authenticate(web_db.session, email, password + "x")
        web_db.session.rollback()
    secret = token.removeprefix(auth.TOKEN_PREFIX)
    assert tokens and accounts
    assert not [row for row in tokens if any(secret in str(value) for value in row)]
    assert not [row for row in accounts if any(password in str(value) for value in row)]
    assert (opens, refused) == (email, None)
    answer = app.test_client().get(
        "/api/jobs?limit=1", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 200


def test_no_secret_is_logged(
    app: Flask, make_token: MakeToken, caplog: pytest.LogCaptureFixture
) -> None:
    """With every logger at DEBUG (SQLAlchemy's statements and parameters
    too), making a token and an account, a request with the token and
    refused ones leave neither the token nor the password in any record."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    token = make_token(app, auth.Role.VIEWER)
    password = f"pw-{uuid.uuid4().hex}"
    with app.app_context():
        auth.add_account(web_db.session, new_email(), password, auth.Role.VIEWER)
        web_db.session.commit()
    client = app.test_client()
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    forbidden = client.post("/api/users", json={}, headers={"Authorization": f"Bearer {token}"})
    assert forbidden.status_code == 403
    unknown = client.get("/api/jobs", headers={"Authorization": f"Bearer {token}x"})
    assert unknown.status_code == 401
    logged = [
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    ]
    assert any("proj_api_tokens" in line for line in logged), "SQL was not captured"
    secret = token.removeprefix(auth.TOKEN_PREFIX)
    assert [line for line in logged if secret in line or password in line] == []


# SECRET_KEY


@pytest.mark.parametrize("key", [None, "", "dev", "change-me", "secret", "fifteen-chars!!"])
def test_create_app_refuses_a_weak_secret_key_outside_the_embedded_setup(
    stack: Stack, celery_app: Celery, key: str | None
) -> None:
    """On PostgreSQL, a missing, known-default or short ``SECRET_KEY`` is a
    ConfigurationError that names the setting; a long random one is used."""
    if not stack.on_postgres:
        pytest.skip("the embedded setup keeps a key of its own (the next test)")
    env = {name: value for name, value in stack.env.items() if name != "SECRET_KEY"}
    if key is not None:
        env["SECRET_KEY"] = key
    with pytest.raises(ConfigurationError, match="SECRET_KEY"):
        create_app(load_settings(env), celery_app)
    good = create_app(stack.settings, celery_app)
    assert good.secret_key == stack.env["SECRET_KEY"]
    with good.app_context():
        web_db.engine.dispose()


@pytest.mark.parametrize("key", ["dev", "changeme", "fifteen-chars!!"])
def test_the_embedded_setup_refuses_a_weak_secret_key_too(tmp_path: Path, key: str) -> None:
    """A known-default or short ``SECRET_KEY`` is refused on the embedded
    setup too (only a missing one gets a key of the setup's own)."""
    settings = load_settings({"PROJ_DATA_DIR": str(tmp_path), "SECRET_KEY": key})
    assert settings.embedded
    with pytest.raises(ConfigurationError, match="set SECRET_KEY"):
        secret_key(settings)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_kept_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    """An existing ``<data_dir>/secret-key`` that others may read (a copy, a
    restore, a wide umask) is refused, saying what to do."""
    kept = tmp_path / "secret-key"
    kept.write_text("a-key-somebody-else-may-have-read")
    kept.chmod(mode)
    settings = load_settings({"PROJ_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigurationError, match=f"may be read by others \\(mode {mode:o}\\)"):
        secret_key(settings)
    kept.chmod(0o600)
    assert secret_key(settings) == "a-key-somebody-else-may-have-read"


def embedded_app(data_dir: Path) -> Flask:
    """The web app of an embedded setup in ``data_dir`` with no ``SECRET_KEY``."""
    settings = load_settings({"PROJ_DATA_DIR": str(data_dir)})
    assert settings.embedded and not settings.secret_key
    current = celery.current_app._get_current_object()
    own = make_celery(settings)
    try:
        flask_app = create_app(settings, own)
        with flask_app.app_context():
            web_db.engine.dispose()
        return flask_app
    finally:
        Jobs.of(own).dispose()
        own.close()
        current.set_current()


def test_the_embedded_setup_keeps_one_random_key(tmp_path: Path) -> None:
    """With no ``SECRET_KEY``, the embedded setup makes a random key, keeps it
    in ``<data_dir>/secret-key`` (readable by its owner only) and uses the
    same one on the next start; another data folder gets another key."""
    first = embedded_app(tmp_path / "one").secret_key
    again = embedded_app(tmp_path / "one").secret_key
    other = embedded_app(tmp_path / "two").secret_key
    kept = tmp_path / "one" / "secret-key"
    assert isinstance(first, str) and len(first) >= 32
    assert first == again == kept.read_text().strip()
    assert other != first
    assert stat.S_IMODE(kept.stat().st_mode) & 0o077 == 0
