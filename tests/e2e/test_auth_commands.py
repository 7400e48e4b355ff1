"""``proj token add|revoke`` and ``proj admin add``, run as the real command on
each stack's database; what they make is then tried over HTTP (Flask's test
client on the same database)."""

from __future__ import annotations

import subprocess
import uuid
from typing import TYPE_CHECKING

import pytest
from flask import Flask
from subprocesses import BIN

from proj.db import db as web_db
from proj.jobs import auth, utcnow

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e


def proj(stack: Stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``proj <args>`` on ``stack``, ``stdin`` as its standard input."""
    return subprocess.run(
        [str(BIN / "proj"), *args],
        input=stdin,
        env=stack.process_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def status(app: Flask, method: str, url: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    return app.test_client().open(url, method=method, headers=headers).status_code


def test_token_add_prints_a_token_once_and_revoke_ends_it(stack: Stack, app: Flask) -> None:
    """``proj token add NAME --role viewer`` prints the token on its last line
    of standard output, and nowhere else; with it a viewer reads (200) and may
    not cancel (403). A second token of that name is refused (non-zero, saying
    why), leaving the first as it was. ``proj token revoke NAME`` ends it (401
    from then on); revoking it again is refused."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    made = proj(stack, "token", "add", name, "--role", "viewer")
    assert made.returncode == 0, made.stdout + made.stderr
    token = made.stdout.splitlines()[-1]
    assert token.startswith(auth.TOKEN_PREFIX) and len(token) > 40
    assert made.stdout.count(token) == 1 and token not in made.stderr
    assert status(app, "GET", "/api/jobs?limit=1", token) == 200
    assert status(app, "POST", f"/api/jobs/{uuid.uuid4()}/cancel", token) == 403

    again = proj(stack, "token", "add", name, "--role", "operator")
    assert again.returncode != 0
    assert f"a token named {name!r} exists already" in again.stderr
    assert status(app, "GET", "/api/jobs?limit=1", token) == 200
    assert status(app, "POST", f"/api/jobs/{uuid.uuid4()}/cancel", token) == 403

    revoked = proj(stack, "token", "revoke", name)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert f"token {name} revoked" in revoked.stdout
    assert status(app, "GET", "/api/jobs?limit=1", token) == 401

    twice = proj(stack, "token", "revoke", name)
    assert twice.returncode != 0
    assert f"no token named {name!r}" in twice.stderr


def test_token_add_refuses_an_unknown_role(stack: Stack, app: Flask) -> None:
    """``--role admin`` exits non-zero naming the roles there are, and makes no token."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    refused = proj(stack, "token", "add", name, "--role", "admin")
    assert refused.returncode != 0
    assert "'viewer'" in refused.stderr and "'operator'" in refused.stderr
    assert auth.TOKEN_PREFIX not in refused.stdout + refused.stderr
    with app.app_context():
        names = web_db.session.scalars(web_db.select(auth.ApiToken.name)).all()
    assert name not in names


def test_admin_add_reads_the_password_from_stdin(stack: Stack, app: Flask) -> None:
    """``proj admin add EMAIL --role operator`` takes the password from
    standard input and never echoes it; the account then opens with that
    password only. The same email again, a short password and an unknown
    role are refused (non-zero, saying why) and make no account."""
    email, password = f"ops-{uuid.uuid4().hex[:10]}@example.com", f"pw-{uuid.uuid4().hex}"
    made = proj(stack, "admin", "add", email, "--role", "operator", stdin=f"{password}\n")
    assert made.returncode == 0, made.stdout + made.stderr
    assert f"account {email} (operator) added" in made.stdout
    assert password not in made.stdout + made.stderr

    again = proj(stack, "admin", "add", email, "--role", "viewer", stdin=f"{password}\n")
    assert again.returncode != 0
    assert f"an account for {email} exists already" in again.stderr

    other = f"ops-{uuid.uuid4().hex[:10]}@example.com"
    short = proj(stack, "admin", "add", other, "--role", "viewer", stdin="short\n")
    assert short.returncode != 0
    assert f"at least {auth.MIN_PASSWORD} characters" in short.stderr
    unknown_role = proj(stack, "admin", "add", other, "--role", "root", stdin=f"{password}\n")
    assert unknown_role.returncode != 0
    assert "'viewer'" in unknown_role.stderr and "'operator'" in unknown_role.stderr

    with app.app_context():
        opened = auth.authenticate(web_db.session, email, password)
        assert opened is not None and opened.role == auth.Role.OPERATOR
        assert auth.authenticate(web_db.session, email, password + "x") is None
        assert auth.authenticate(web_db.session, other, password) is None
        web_db.session.rollback()


def test_admin_password_and_remove(stack: Stack, app: Flask) -> None:
    """``proj admin password EMAIL`` sets the password read from standard
    input (the old one opens nothing after it); ``proj admin remove EMAIL``
    removes the account; either for an unknown email is refused, saying so."""
    email, old, new = f"ops-{uuid.uuid4().hex[:10]}@example.com", "old-password", "new-password"
    assert proj(stack, "admin", "add", email, "--role", "viewer", stdin=f"{old}\n").returncode == 0
    changed = proj(stack, "admin", "password", email, stdin=f"{new}\n")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "sessions have ended" in changed.stdout and new not in changed.stdout
    with app.app_context():
        assert auth.authenticate(web_db.session, email, old) is None
        assert auth.authenticate(web_db.session, email, new) is not None
        web_db.session.rollback()
    removed = proj(stack, "admin", "remove", email)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    with app.app_context():
        assert auth.authenticate(web_db.session, email, new) is None
        web_db.session.rollback()
    for args in (("remove", email), ("password", email)):
        refused = proj(stack, "admin", *args, stdin=f"{new}\n")
        assert refused.returncode != 0
        assert f"no account for {email!r}" in refused.stderr


def test_token_add_with_an_expiry_lists_and_ends(stack: Stack, app: Flask) -> None:
    """``--expires 90d`` makes a token that works until then; ``proj token
    list`` shows its role, tenant, last use (once used) and expiry; past its
    expiry it opens nothing (401). A duration that is not one is refused."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    made = proj(stack, "token", "add", name, "--role", "viewer", "--expires", "90d")
    assert made.returncode == 0, made.stdout + made.stderr
    token = made.stdout.splitlines()[-1]
    assert status(app, "GET", "/api/jobs?limit=1", token) == 200
    listed = proj(stack, "token", "list")
    assert listed.returncode == 0, listed.stderr
    [line] = [line for line in listed.stdout.splitlines() if line.startswith(f"{name} ")]
    assert "viewer" in line and "never used" not in line and "never expires" not in line
    assert token not in listed.stdout
    with app.app_context():
        web_db.session.execute(
            web_db.update(auth.ApiToken)
            .where(auth.ApiToken.name == name)
            .values(expires_at=utcnow())
        )
        web_db.session.commit()
    assert status(app, "GET", "/api/jobs?limit=1", token) == 401
    for bad in ("90", "1y", "0d", "-5d"):
        refused = proj(stack, "token", "add", f"{name}-{bad}", "--role", "viewer", "--expires", bad)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "Invalid value for '--expires'" in refused.stderr, refused.stderr
