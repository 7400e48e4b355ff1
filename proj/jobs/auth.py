"""Who may see and act on jobs: console accounts (email and password) and API
tokens (``Authorization: Bearer <token>``), each with a role; and the console
sign-in attempts counted against their limit (:class:`LoginAttempt`).

A ``viewer`` reads; an ``operator`` also writes. Passwords are hashed with
Werkzeug's scrypt; a token is shown once, when it is made, and only its
SHA-256 is stored (a token is 256 random bits, so a fast hash is enough).

:func:`require_token` guards a blueprint: every request needs a token, and a
request that is not ``GET``/``HEAD``/``OPTIONS`` needs an operator's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from sqlalchemy import Index, String, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column
from werkzeug.security import check_password_hash, generate_password_hash

from proj.jobs import context
from proj.jobs.clock import UtcDateTime, utcnow
from proj.jobs.errors import ProjError
from proj.jobs.http import json_error
from proj.jobs.models import LedgerBase

TOKEN_PREFIX = "proj_"  # noqa: S105  (marks a proj token; the secret follows it)
MIN_PASSWORD = 8
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TENANT_SLUG = re.compile(r"[a-z0-9_-]{1,64}")


class Role(StrEnum):
    """What an account or a token may do: a ``viewer`` reads; an ``operator``
    also acts (retries, cancels, and the API's writes)."""

    VIEWER = "viewer"
    OPERATOR = "operator"

    def may(self, needed: Role) -> bool:
        """True when this role may do what ``needed`` may."""
        return self == Role.OPERATOR or needed == Role.VIEWER


class AuthError(ProjError):
    """An account or token cannot be made or changed as asked."""


class Account(LedgerBase):
    """A console account."""

    __tablename__ = "proj_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    session_nonce: Mapped[str | None] = mapped_column(String(64), default=None)
    """What every console session of the account carries; a new one (at
    sign-out, a password change) ends them all on the server. None: no
    session is open."""

    def end_sessions(self) -> None:
        """End every console session of the account (from its next request on)."""
        self.session_nonce = secrets.token_hex(16)


class ApiToken(LedgerBase):
    """An API token: its name, role and hash (never the token itself)."""

    __tablename__ = "proj_api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    tenant: Mapped[str | None] = mapped_column(String(64))
    """The tenant whose rows a request with this token sees (None: no tenant)."""
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    """When the token stops opening anything (None: never)."""
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    """When a request last used it (to the minute)."""


class LoginAttempt(LedgerBase):
    """A console sign-in attempt let through, for as long as it counts against
    its limit (:mod:`proj.jobs.login_limit`, when attempts are counted in the
    database)."""

    __tablename__ = "proj_login_attempts"
    __table_args__ = (Index("ix_proj_login_attempts_key_expires_at", "key", "expires_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    """SHA-256 of what is counted (the client address or the email tried, and
    the rate): neither the address nor the email is kept."""
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    """When the attempt stops counting (and may be deleted)."""


@functools.cache
def _nobody() -> str:
    # Checked when the email is unknown, so a wrong email takes as long as a
    # wrong password; made at first use, so importing costs no scrypt.
    return generate_password_hash(secrets.token_hex(16))


def _role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AuthError(f"role must be one of {', '.join(Role)}, not {role!r}") from None


def add_account(session: Session, email: str, password: str, role: str) -> Account:
    """A new account (flushed in ``session``'s transaction)."""
    email = email.strip().lower()
    if "@" not in email:
        raise AuthError(f"{email!r} is not an email address")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"the password must have at least {MIN_PASSWORD} characters")
    account = Account(email=email, password_hash=generate_password_hash(password), role=_role(role))
    _flush_new(session, account, f"an account for {email} exists already")
    return account


def authenticate(session: Session, email: str, password: str) -> Account | None:
    """The account these credentials open, or None."""
    account = find_account(session, email)
    matches = check_password_hash(account.password_hash if account else _nobody(), password)
    return account if account is not None and matches else None


def find_account(session: Session, email: str) -> Account | None:
    """The account of ``email`` (in any case, spaces around it ignored), or None."""
    email = email.strip().lower()
    # No account's email holds a NUL, which PostgreSQL refuses in text.
    if "\x00" in email:
        return None
    return session.scalar(select(Account).where(Account.email == email))


def set_password(session: Session, email: str, password: str) -> Account:
    """Give the account of ``email`` a new password, ending its console
    sessions. :class:`AuthError` if there is no such account."""
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"the password must have at least {MIN_PASSWORD} characters")
    account = _account(session, email)
    account.password_hash = generate_password_hash(password)
    account.end_sessions()
    session.flush()
    return account


def remove_account(session: Session, email: str) -> None:
    """Remove the account of ``email``; its sessions end with it.
    :class:`AuthError` if there is no such account."""
    session.delete(_account(session, email))
    session.flush()


def _account(session: Session, email: str) -> Account:
    found = session.scalar(select(Account).where(Account.email == email.strip().lower()))
    if found is None:
        raise AuthError(f"no account for {email.strip().lower()!r}")
    return found


def has_accounts(session: Session) -> bool:
    """True once any console account exists."""
    return bool(session.scalar(select(func.count()).select_from(Account)))


def add_token(
    session: Session,
    name: str,
    role: str,
    tenant: str | None = None,
    expires_in: timedelta | None = None,
) -> str:
    """A new token named ``name`` (flushed in ``session``'s transaction): the
    only time the token itself is known. With ``tenant``, requests with it
    act for that tenant only (:mod:`proj.jobs.context`); with ``expires_in``,
    it opens nothing once that time has passed."""
    name = name.strip()
    if not name:
        raise AuthError("a token needs a name")
    if tenant is not None and not TENANT_SLUG.fullmatch(tenant):
        raise AuthError(f"a tenant is 1 to 64 of a-z, 0-9, - and _, not {tenant!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + expires_in if expires_in is not None else None
    row = ApiToken(
        name=name, token_hash=_digest(token), role=_role(role), tenant=tenant, expires_at=expires_at
    )
    _flush_new(session, row, f"a token named {name!r} exists already")
    return token


def revoke_token(session: Session, name: str) -> bool:
    """Delete the token named ``name``; False if there was none."""
    deleted = session.execute(delete(ApiToken).where(ApiToken.name == name.strip()))
    return bool(getattr(deleted, "rowcount", 0))


def token_for(session: Session, token: str) -> ApiToken | None:
    """The live token row for ``token``, or None (unknown, revoked or expired)."""
    found = session.scalar(select(ApiToken).where(ApiToken.token_hash == _digest(token)))
    # The index found it by hash; comparing again in constant time costs nothing.
    if found is None or not hmac.compare_digest(found.token_hash, _digest(token)):
        return None
    if found.expires_at is not None and found.expires_at <= utcnow():
        return None
    return found


def tokens(session: Session) -> list[ApiToken]:
    """Every token, by name."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


LAST_USE_GRAIN = timedelta(minutes=1)
"""How often a token's ``last_used_at`` is written, at most (not every request)."""


def note_use(session: Session, found: ApiToken) -> None:
    """Record that ``found`` is in use now, unless it was within
    :data:`LAST_USE_GRAIN` (in ``session``'s transaction)."""
    now = utcnow()
    if found.last_used_at is not None and now - found.last_used_at < LAST_USE_GRAIN:
        return
    session.execute(
        update(ApiToken)
        .where(ApiToken.id == found.id)
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _flush_new(session: Session, row: Any, conflict: str) -> None:
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise AuthError(conflict) from None


def require_token(blueprint: Blueprint) -> None:
    """Every request to ``blueprint`` needs a bearer token: 401 without a
    known one, 403 when its role may not do what the request asks. The
    token's row is ``g.proj_token`` in the view, and its tenant the
    request's (:func:`proj.jobs.context.current_tenant`) until it ends."""
    blueprint.before_request(_check_bearer)
    blueprint.teardown_request(_forget_tenant)


def require_token_under(flask_app: Flask, prefix: str) -> None:
    """A request under ``prefix`` that matches no view (a 404 or 405) needs a
    token too, so that someone without one learns nothing of the routes."""

    def check() -> tuple[Response, int, dict[str, str]] | None:
        if request.url_rule is None and request.path.startswith(prefix):
            return _check_bearer()
        return None

    flask_app.before_request(check)
    flask_app.teardown_request(_forget_tenant)


def _check_bearer() -> tuple[Response, int, dict[str, str]] | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="proj"'}
    if scheme.lower() != "bearer" or not token.strip():
        return (*json_error(401, "unauthorized", "send Authorization: Bearer <token>"), challenge)
    session = request_session()
    found = token_for(session, token.strip())
    if found is not None:
        note_use(session, found)
        session.expunge(found)
    # The look-up's transaction began with no tenant: the request's own
    # begins afresh, with the token's.
    session.commit()
    if found is None:
        challenge["WWW-Authenticate"] += ', error="invalid_token"'
        message = "the token is unknown, revoked or expired"
        return (*json_error(401, "unauthorized", message), challenge)
    needed = Role.VIEWER if request.method in SAFE_METHODS else Role.OPERATOR
    if not Role(found.role).may(needed):
        message = f"a {found.role} token may not {request.method} here; an operator's may"
        return (*json_error(403, "forbidden", message), {})
    g.proj_token = found
    context.set_tenant(found.tenant)
    return None


def _forget_tenant(_: BaseException | None = None) -> None:
    # A server thread serves request after request: the next starts with none.
    context.set_tenant(None)


def token_tenant() -> str | None:
    """The tenant of the request's token (None: the rows of no tenant)."""
    found: ApiToken | None = g.get("proj_token")
    return found.tenant if found is not None else None


def request_session() -> Session:
    """The Flask app's ``db.session`` (the one given to ``Jobs.init_app``)."""
    db = current_app.extensions["proj.jobs"].flask_db
    session: Session = db.session()
    return session
