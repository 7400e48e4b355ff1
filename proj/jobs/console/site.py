"""The console's frame: its blueprint, who gets in, and what every page and
form must carry.

- Every page but the login page and static files needs a signed-in console
  account (:class:`~proj.jobs.auth.Account`), in a session that has not
  ended (:mod:`proj.jobs.console.sessions`); a viewer reads, and only an
  operator may POST anything but the login and logout forms.
- Every POST carries a CSRF token (Flask-WTF's); one without a valid token
  is refused before it reaches a view, so it changes nothing.
- Sign-in attempts are limited per client address and per account tried
  (:mod:`proj.jobs.login_limit`): ``PROJ_LOGIN_RATE_LIMIT`` in the Flask
  config, default ``10/minute``, counted where ``PROJ_RATELIMIT_STORAGE_URI``
  says (``database``, ``redis://...`` or ``memory://``; unset, the database,
  or each process's memory on SQLite). A store that does not answer refuses
  the attempt (503).
- Sign-ins, failed sign-ins (those the limit let through) and sign-outs
  are recorded in the audit trail (:mod:`proj.jobs.audit`).
- Responses carry a content security policy (no inline script or style, no
  framing) and are not cached.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from limits import parse
from limits.errors import StorageError
from sqlalchemy.orm import Session
from werkzeug.wrappers.response import Response as BaseResponse
from wtforms import ValidationError

from proj.jobs import audit, auth, context, login_limit
from proj.jobs.console import sessions
from proj.jobs.http import json_error

blueprint = Blueprint(
    "proj_console",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
"""The console: mount it (``proj.jobs.console.blueprint``) once ``jobs.init_app``
has run and ``SECRET_KEY`` is set."""

DEFAULT_RATE = "10/minute"
"""Sign-in attempts allowed per address and per account (``PROJ_LOGIN_RATE_LIMIT`` unset)."""
PUBLIC = frozenset({"proj_console.login", "proj_console.static"})
ANYONE_MAY_POST = frozenset({"proj_console.login", "proj_console.logout"})
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class Refused(Exception):
    """A console request refused: answered as an HTML page to a browser,
    as the JSON error to anything else."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@blueprint.errorhandler(Refused)
def _refused(error: Refused) -> Any:
    return refusal(error.status, error.code, error.message)


@blueprint.errorhandler(CSRFError)
def _bad_csrf(error: CSRFError) -> Any:
    return refusal(400, "csrf_failed", f"the form's CSRF token is not valid: {error.description}")


def refusal(status: int, code: str, message: str) -> Any:
    if request.accept_mimetypes.accept_html:
        return render_template("proj_console/refused.html", message=message), status
    return json_error(status, code, message)


@blueprint.app_template_global()
def csrf_token() -> str:
    token: str = generate_csrf()
    return token


@blueprint.before_request
def _guard() -> BaseResponse | None:
    if request.method == "POST":
        _check_csrf()
    if request.endpoint in PUBLIC:
        return None
    account = sessions.current()
    if account is None:
        if request.method == "POST":
            raise Refused(401, "unauthorized", "sign in to the console first")
        return redirect(url_for("proj_console.login", next=request.full_path.rstrip("?")))
    g.console_account = account
    # The console shows every tenant's jobs: the request's transactions are
    # in the system scope (one begun already is put in it here; the session
    # begins any later one in it).
    g.proj_system = context.system_var.set(True)
    session = auth.request_session()
    if session.in_transaction():
        context.scope_system(session.connection())
    writes = request.method == "POST" and request.endpoint not in ANYONE_MAY_POST
    if writes and not auth.Role(account.role).may(auth.Role.OPERATOR):
        raise Refused(403, "forbidden", "a viewer may look but not act; ask an operator")
    return None


def _check_csrf() -> None:
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError as exc:
        raise CSRFError(str(exc)) from None


@blueprint.teardown_request
def _leave_system_scope(_: BaseException | None) -> None:
    if (token := g.pop("proj_system", None)) is not None:
        context.system_var.reset(token)


@blueprint.after_request
def _headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    if request.endpoint != "proj_console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


def may_act() -> bool:
    """True when the signed-in account may retry and cancel (templates show buttons)."""
    account: auth.Account | None = g.get("console_account")
    return account is not None and auth.Role(account.role).may(auth.Role.OPERATOR)


blueprint.add_app_template_global(may_act, "console_may_act")


@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """The sign-in form; signs in and goes where the visitor was headed."""
    target = _local(request.values.get("next"))
    if request.method == "GET":
        return render_template("proj_console/login.html", next=target)
    email = request.form.get("email", "")
    refused = _attempt_refusal(email)
    if refused is not None:
        return render_template("proj_console/login.html", next=target, error=refused), 429
    session = auth.request_session()
    account = auth.authenticate(session, email, request.form.get("password", ""))
    if account is None:
        _record_failure(session, email)
        error = "that email and password do not match an account"
        return render_template("proj_console/login.html", next=target, error=error), 401
    sessions.begin(account)
    audit.record_request(session, audit.Action.SIGN_IN, actor=audit.account_actor(account.email))
    session.commit()
    return redirect(target or url_for("proj_console.overview"))


def _record_failure(session: Session, email: str) -> None:
    """Record a failed sign-in: the account's email if one has it, never the
    text typed (a password typed in the wrong field would be kept)."""
    tried = auth.find_account(session, email)
    reason = "wrong password" if tried is not None else "no such account"
    target = tried.email if tried is not None else None
    audit.record_request(
        session, audit.Action.SIGN_IN_FAILED, target=target, detail={"reason": reason}
    )
    session.commit()


@blueprint.post("/logout")
def logout() -> BaseResponse:
    """Sign out: every session of the account ends, on the server."""
    audit.record_request(auth.request_session(), audit.Action.SIGN_OUT)
    sessions.end(g.get("console_account"))  # commits the entry with the new nonce
    return redirect(url_for("proj_console.login"))


def _local(target: str | None) -> str | None:
    """``target`` if it is a path on this site (never another host, nor a
    header broken by a line break)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    # Browsers read "/\host" as "//host"; a control character breaks the header.
    if "\\" in target or not target.isprintable():
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _attempt_refusal(email: str) -> str | None:
    """Why this sign-in attempt may not go ahead (None: it may), counting it."""
    limit: login_limit.LoginLimit | None = current_app.extensions.get("proj.console.login_limit")
    if limit is None:
        config = current_app.config
        database_url = str(auth.request_session().get_bind().engine.url)
        limit = login_limit.login_limit(
            config.get("PROJ_RATELIMIT_STORAGE_URI") or login_limit.default_store(database_url),
            parse(config.get("PROJ_LOGIN_RATE_LIMIT", DEFAULT_RATE)),
            auth.request_session,
        )
        current_app.extensions["proj.console.login_limit"] = limit
    try:
        refused = limit.refusal(request.remote_addr or "unknown", email)
    except StorageError:
        raise Refused(
            503, "unavailable", "sign-in attempts cannot be counted just now; try again shortly"
        ) from None
    if refused is None:
        return None
    where = "from this address" if refused == "address" else "for this account"
    return f"too many sign-in attempts {where} (at most {limit.rate}); wait and try again"
