"""Signing in to the console as a browser does, for the console's tests."""

from __future__ import annotations

import html
import re
import uuid

from flask import Flask
from flask.testing import FlaskClient

from proj.db import db as web_db
from proj.jobs import auth

PASSWORD = "console-test-password"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(page: str) -> str:
    """The CSRF token of the first form on ``page``."""
    found = TOKEN.search(page)
    assert found is not None, "the page has no form with a CSRF token"
    return html.unescape(found.group(1))


def signed_in(app: Flask, role: str) -> FlaskClient:
    """A browser signed in to the console, through its form, as a new ``role`` account."""
    email = f"{role}-{uuid.uuid4().hex[:12]}@example.com"
    with app.app_context():
        auth.add_account(web_db.session, email, PASSWORD, role)
        web_db.session.commit()
    browser = app.test_client()
    form = browser.get("/dashboard/login")
    answer = browser.post(
        "/dashboard/login",
        data={"email": email, "password": PASSWORD, "csrf_token": csrf_of(form.text)},
    )
    assert answer.status_code == 302, answer.text
    return browser
