"""The console's frame over HTTP: who gets in, what every response carries,
and what a request without its CSRF token or with the wrong role changes
(nothing)."""

from __future__ import annotations

import dataclasses
import re
import secrets
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, func, select
from werkzeug.test import TestResponse

from proj.db import db
from proj.jobs import auth, utcnow
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
    # A NUL, which PostgreSQL refuses in text, matches no account either.
    for tried in (
        (email, password + "x"),
        ("nobody@example.com", password),
        (email + "\x00", password),
    ):
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


RATE = "3/minute"
"""The sign-in limit of the apps :func:`make_app` makes."""


def new_address() -> str:
    """A client address no other test uses (the stack's stores outlive a test)."""
    number = secrets.randbits(24)
    return f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}"


def new_email() -> str:
    return f"tried-{uuid.uuid4().hex[:12]}@example.com"


def attempt(client: FlaskClient, email: str, password: str = "", **environ: str) -> TestResponse:
    """A sign-in through the form, the request's WSGI ``environ`` given
    (``REMOTE_ADDR``, ``HTTP_X_FORWARDED_FOR``)."""
    token = csrf_of(client.get("/dashboard/login", environ_base=environ).text)
    form = {"email": email, "password": password, "csrf_token": token, "next": ""}
    return client.post("/dashboard/login", data=form, environ_base=environ)


@pytest.fixture
def make_app(stack: Stack, celery_app: Celery) -> Iterator[Callable[..., Flask]]:
    """Makes the web application on the stack as each web process has it (a
    limiter of its own, counting in the store its settings name), allowing
    :data:`RATE` sign-in attempts; keyword arguments change its settings."""
    made: list[Flask] = []

    def make(**changes: Any) -> Flask:
        flask_app = create_app(dataclasses.replace(stack.settings, **changes), celery_app)
        flask_app.config["PROJ_LOGIN_RATE_LIMIT"] = RATE
        made.append(flask_app)
        return flask_app

    yield make
    for flask_app in made:
        with flask_app.app_context():
            db.engine.dispose()


def test_sign_in_attempts_are_limited_per_address(make_app: Callable[..., Flask]) -> None:
    """Attempts from one address on many accounts: the fourth is refused,
    the right password too, and another address is not."""
    app = make_app()
    email, password = account(app, "operator")
    client, address = app.test_client(), new_address()
    statuses = [attempt(client, new_email(), REMOTE_ADDR=address).status_code for _ in range(3)]
    assert statuses == [401, 401, 401]
    limited = attempt(client, email, password, REMOTE_ADDR=address)  # right, but one too many
    assert limited.status_code == 429
    assert "from this address" in limited.text
    assert client.get("/dashboard/").status_code == 302
    assert attempt(client, email, password, REMOTE_ADDR=new_address()).status_code == 302


def test_sign_in_attempts_are_limited_per_account(make_app: Callable[..., Flask]) -> None:
    """Attempts on one account from many addresses: the fourth is refused,
    whatever address it comes from, and another account is not."""
    app = make_app()
    email, password = account(app, "viewer")
    client = app.test_client()
    statuses = [attempt(client, email, REMOTE_ADDR=new_address()).status_code for _ in range(3)]
    assert statuses == [401, 401, 401]
    limited = attempt(client, f" {email.upper()} ", password, REMOTE_ADDR=new_address())
    assert limited.status_code == 429
    assert "for this account" in limited.text
    assert client.get("/dashboard/").status_code == 302
    assert attempt(client, new_email(), REMOTE_ADDR=new_address()).status_code == 401


@pytest.mark.parametrize("store", ["default", "database"])
def test_web_processes_share_the_count(
    stack: Stack, make_app: Callable[..., Flask], store: str
) -> None:
    """Two web processes (two apps, a limiter each) count in one store: by
    default the broker's Redis on pg-redis and the database on pg-rabbit;
    the database when it is named, on every stack. Three attempts in all,
    per address and per account, not three in each process."""
    if store == "default" and not stack.on_postgres:
        pytest.skip("the embedded setup counts in each process's memory")
    changes = {"ratelimit_storage_uri": "database"} if store == "database" else {}
    first, second = make_app(**changes), make_app(**changes)
    clients = [first.test_client(), second.test_client()]
    address = new_address()
    statuses = [
        attempt(clients[n % 2], new_email(), REMOTE_ADDR=address).status_code for n in range(3)
    ]
    assert statuses == [401, 401, 401]
    for client in clients:
        limited = attempt(client, new_email(), REMOTE_ADDR=address)
        assert (limited.status_code, "from this address" in limited.text) == (429, True)
    email = new_email()
    statuses = [
        attempt(clients[n % 2], email, REMOTE_ADDR=new_address()).status_code for n in range(3)
    ]
    assert statuses == [401, 401, 401]
    for client in clients:
        limited = attempt(client, email, REMOTE_ADDR=new_address())
        assert (limited.status_code, "for this account" in limited.text) == (429, True)
    broker = stack.env.get("CELERY_BROKER_URL", "")
    expected = broker if store == "default" and broker.startswith("redis://") else "database"
    assert first.config["PROJ_RATELIMIT_STORAGE_URI"] == expected
    if expected == "database":
        with first.app_context():
            live = select(func.count()).where(auth.LoginAttempt.expires_at > utcnow())
            assert (db.session.scalar(live) or 0) >= 6  # the attempts let through


def test_attempts_at_once_in_the_database_never_pass_the_limit(
    make_app: Callable[..., Flask],
) -> None:
    """Twelve attempts from one address at the same moment, through two web
    processes counting in the database: three go ahead, never more."""
    apps = [make_app(ratelimit_storage_uri="database") for _ in range(2)]
    address = new_address()
    clients = [apps[n % 2].test_client() for n in range(12)]
    tokens = [csrf_of(client.get("/dashboard/login").text) for client in clients]
    start = threading.Barrier(len(clients))

    def post(n: int) -> int:
        form = {"email": new_email(), "password": "", "csrf_token": tokens[n], "next": ""}
        start.wait()
        answer = clients[n].post(
            "/dashboard/login", data=form, environ_base={"REMOTE_ADDR": address}
        )
        return answer.status_code

    with ThreadPoolExecutor(len(clients)) as pool:
        statuses = sorted(pool.map(post, range(len(clients))))
    assert statuses == [401] * 3 + [429] * 9


def test_a_store_that_does_not_answer_refuses_the_attempt(make_app: Callable[..., Flask]) -> None:
    """Attempts that cannot be counted do not go ahead uncounted: 503, and
    the right password signs nobody in."""
    app = make_app(ratelimit_storage_uri=f"redis://127.0.0.1:{closed_port()}/0")
    email, password = account(app, "operator")
    client = app.test_client()
    refused = attempt(client, email, password, REMOTE_ADDR=new_address())
    assert refused.status_code == 503
    assert "cannot be counted" in refused.text
    assert client.get("/dashboard/").status_code == 302


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_behind_a_trusted_proxy_each_client_is_counted_apart(
    make_app: Callable[..., Flask],
) -> None:
    """With ``PROJ_TRUSTED_PROXIES=1``, requests that all come from the proxy
    are counted by the address it appended to ``X-Forwarded-For``: a second
    client is not limited by the first, and what a client wrote in the header
    itself before the proxy's address changes nothing."""
    app = make_app(trusted_proxies=1)
    client, proxy = app.test_client(), new_address()
    first, second = new_address(), new_address()
    statuses = [
        attempt(client, new_email(), REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR=first).status_code
        for _ in range(3)
    ]
    assert statuses == [401, 401, 401]
    forged = f"{new_address()}, {first}"  # the client's own value, then the proxy's
    limited = attempt(client, new_email(), REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR=forged)
    assert limited.status_code == 429
    other = attempt(client, new_email(), REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR=second)
    assert other.status_code == 401


def test_a_forged_forwarded_for_does_not_escape_the_limit(make_app: Callable[..., Flask]) -> None:
    """Trusting no proxy (the default), a client that sends a new
    ``X-Forwarded-For`` with each attempt is still counted by its own address."""
    app = make_app()
    client, address = app.test_client(), new_address()
    statuses = [
        attempt(
            client, new_email(), REMOTE_ADDR=address, HTTP_X_FORWARDED_FOR=new_address()
        ).status_code
        for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]


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
