"""The console's frame over HTTP: who gets in, what every response carries,
and what a request without its CSRF token or with the wrong role changes
(nothing)."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, func, select

from proj.db import db
from proj.jobs import auth
from proj.jobs.console import sessions
from proj.web import create_app

if TYPE_CHECKING:
    from conftest import Stack

PAGES = [
    "/dashboard/",
    "/dashboard/jobs",
    "/dashboard/periodic",
    "/dashboard/workers",
    "/dashboard/tokens",
]


def account(app: Flask, role: str) -> tuple[str, str]:
    email, password = f"{role}-{uuid.uuid4().hex[:8]}@example.com", uuid.uuid4().hex
    with app.app_context():
        auth.add_account(db.session, email, password, role)
        db.session.commit()
    return email, password


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def sign_in(client: FlaskClient, email: str, password: str, next_: str = "") -> object:
    token = csrf_of(client.get("/dashboard/login").text)
    form = {"email": email, "password": password, "csrf_token": token, "next": next_}
    return client.post("/dashboard/login", data=form)


@pytest.fixture
def browser(app: Flask) -> FlaskClient:
    """A client with no API token, as a browser is."""
    return app.test_client()


def test_every_page_sends_a_visitor_to_sign_in(browser: FlaskClient) -> None:
    for page in PAGES:
        answer = browser.get(page)
        assert answer.status_code == 302, page
        assert answer.headers["Location"].startswith("/dashboard/login?next="), page
    assert browser.get("/dashboard/login").status_code == 200
    with browser.get("/dashboard/static/console.css") as stylesheet:
        assert stylesheet.status_code == 200
        assert stylesheet.mimetype == "text/css"


def test_signing_in_opens_every_page_and_signing_out_closes_them(
    app: Flask, browser: FlaskClient
) -> None:
    email, password = account(app, "viewer")
    answer = sign_in(browser, email, password, next_="/dashboard/workers")
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/dashboard/workers"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    for page in PAGES:
        opened = browser.get(page)
        assert opened.status_code == 200, page
        assert email in opened.text, page
    token = csrf_of(browser.get("/dashboard/").text)
    assert browser.post("/dashboard/logout", data={"csrf_token": token}).status_code == 302
    assert browser.get("/dashboard/").status_code == 302


def copied_session(app: Flask, browser: FlaskClient) -> FlaskClient:
    """Another client carrying a copy of ``browser``'s session cookie, as a
    cookie taken from a browser would be used."""
    copy = app.test_client()
    cookie = browser.get_cookie(app.config.get("SESSION_COOKIE_NAME", "session"))
    assert cookie is not None
    copy.set_cookie(cookie.key, cookie.value)
    return copy


def test_signing_out_ends_every_copy_of_the_session(app: Flask, browser: FlaskClient) -> None:
    """A copy of the cookie taken before sign-out opens nothing after it; the
    account signs in again as usual."""
    email, password = account(app, "operator")
    sign_in(browser, email, password)
    copy = copied_session(app, browser)
    assert copy.get("/dashboard/").status_code == 200
    token = csrf_of(browser.get("/dashboard/").text)
    assert browser.post("/dashboard/logout", data={"csrf_token": token}).status_code == 302
    assert copy.get("/dashboard/").status_code == 302
    assert sign_in(browser, email, password).status_code == 302
    assert browser.get("/dashboard/").status_code == 200
    assert copy.get("/dashboard/").status_code == 302


@pytest.mark.parametrize("change", ["password", "removal", "removal-and-new-account"])
def test_a_password_change_or_removal_ends_the_accounts_sessions(
    app: Flask, browser: FlaskClient, change: str
) -> None:
    """After ``proj admin password`` or ``proj admin remove`` (the functions
    they call), the account's open session is out at its next request; a new
    account, which SQLite may give the removed one's id, is not opened by it."""
    email, password = account(app, "viewer")
    sign_in(browser, email, password)
    assert browser.get("/dashboard/").status_code == 200
    with app.app_context():
        if change == "password":
            auth.set_password(db.session, email, "a-new-password")
        else:
            auth.remove_account(db.session, email)
        db.session.commit()
    if change == "removal-and-new-account":
        account(app, "operator")
    assert browser.get("/dashboard/").status_code == 302
    if change == "password":
        assert sign_in(browser, email, "a-new-password").status_code == 302
        assert browser.get("/dashboard/").status_code == 200


@pytest.mark.parametrize("key", ["PROJ_SESSION_IDLE_TIMEOUT", "PROJ_SESSION_LIFETIME"])
def test_a_session_ends_when_idle_or_old(app: Flask, browser: FlaskClient, key: str) -> None:
    """A session unused for the idle timeout, or older than its lifetime
    however busy, is out."""
    email, password = account(app, "viewer")
    sign_in(browser, email, password)
    assert browser.get("/dashboard/").status_code == 200
    moved = sessions.SEEN if key == "PROJ_SESSION_IDLE_TIMEOUT" else sessions.BEGAN
    limit = float(app.config.get(key, 0))
    assert limit > 0
    with browser.session_transaction() as session:
        session[moved] = session[moved] - limit - 1
    assert browser.get("/dashboard/").status_code == 302


def test_a_wrong_password_or_unknown_email_opens_nothing(app: Flask, browser: FlaskClient) -> None:
    email, password = account(app, "operator")
    for tried in ((email, password + "x"), ("nobody@example.com", password)):
        answer = sign_in(browser, *tried)
        assert answer.status_code == 401
        assert "do not match" in answer.text
        with browser.session_transaction() as session:
            assert sessions.ACCOUNT not in session
    assert browser.get("/dashboard/").status_code == 302


def test_sign_in_goes_nowhere_off_site(app: Flask, browser: FlaskClient) -> None:
    email, password = account(app, "viewer")
    for target in (
        "//evil.example/",
        "https://evil.example/",
        "javascript:alert(1)",
        "/\\evil.example/",
        "/dashboard/\r\nSet-Cookie: x=1",
        "/dashboard/\n",
    ):
        answer = sign_in(browser, email, password, next_=target)
        assert answer.headers["Location"] == "/dashboard/", target


def test_sign_in_without_its_csrf_token_is_refused(app: Flask, browser: FlaskClient) -> None:
    email, password = account(app, "operator")
    browser.get("/dashboard/login")
    answer = browser.post("/dashboard/login", data={"email": email, "password": password})
    assert answer.status_code == 400
    assert "CSRF" in answer.text
    assert browser.get("/dashboard/").status_code == 302


def test_sign_in_attempts_are_limited_per_address(stack: Stack, celery_app: object) -> None:
    app = create_app(stack.settings, celery_app)  # type: ignore[arg-type]
    app.config["PROJ_LOGIN_RATE_LIMIT"] = "3/minute"
    email, password = account(app, "operator")
    client = app.test_client()
    statuses = [sign_in(client, email, "wrong-password").status_code for _ in range(3)]
    assert statuses == [401, 401, 401]
    limited = sign_in(client, email, password)  # right, but one too many
    assert limited.status_code == 429
    assert client.get("/dashboard/").status_code == 302
    other = client.post(
        "/dashboard/login",
        data={"email": email, "password": password, "csrf_token": "x"},
        environ_base={"REMOTE_ADDR": "10.0.0.9"},
    )
    assert other.status_code == 400  # another address is not limited (its form is stale)
    with app.app_context():
        db.engine.dispose()


def test_a_deleted_account_is_out_at_once(app: Flask, browser: FlaskClient) -> None:
    email, password = account(app, "operator")
    sign_in(browser, email, password)
    assert browser.get("/dashboard/").status_code == 200
    with app.app_context():
        db.session.execute(delete(auth.Account).where(auth.Account.email == email))
        db.session.commit()
    assert browser.get("/dashboard/").status_code == 302


def test_pages_carry_the_security_headers(app: Flask, browser: FlaskClient) -> None:
    email, password = account(app, "viewer")
    sign_in(browser, email, password)
    for page in [*PAGES, "/dashboard/login"]:
        headers = browser.get(page).headers
        policy = headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, page
        assert "unsafe-inline" not in policy, page
        assert headers["X-Frame-Options"] == "DENY", page
        assert headers["X-Content-Type-Options"] == "nosniff", page
        assert headers["Cache-Control"] == "no-store", page


def test_pages_have_no_inline_script_or_style(app: Flask, browser: FlaskClient) -> None:
    """The policy forbids them: a page that used one would break in a browser."""
    email, password = account(app, "operator")
    sign_in(browser, email, password)
    for page in [*PAGES, "/dashboard/login"]:
        html = browser.get(page).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), page
        assert not re.search(r"\sstyle=", html), page


def test_secure_cookies_outside_the_embedded_setup(stack: Stack, app: Flask) -> None:
    email, password = account(app, "viewer")
    cookie = sign_in(app.test_client(), email, password).headers["Set-Cookie"]
    assert ("Secure" in cookie) == stack.on_postgres


def test_accounts_keep_only_a_hash_of_the_password(app: Flask) -> None:
    email, password = account(app, "viewer")
    with app.app_context():
        stored = db.session.scalar(select(auth.Account).where(auth.Account.email == email))
        assert stored is not None
        assert password not in stored.password_hash
        assert stored.password_hash.startswith("scrypt:")
        count = db.session.scalar(select(func.count()).select_from(auth.Account))
        assert count and count >= 1
