"""Console sessions that end on the server.

A session is a signed cookie (Flask's) holding the account's id, the
account's session nonce (:attr:`~proj.jobs.auth.Account.session_nonce`),
when it began and when it was last used. Every request checks all four
against the account's row and the clock, so a session ends:

- at sign-out, at a password change and at the account's removal, for every
  copy of the cookie (the account gets a new nonce, or is gone);
- after ``PROJ_SESSION_IDLE_TIMEOUT`` seconds without a request (default one
  hour), and ``PROJ_SESSION_LIFETIME`` seconds after sign-in whatever
  happens (default twelve hours): Flask config keys, which the reference
  application sets from the environment.
"""

from __future__ import annotations

import hmac
import time

from flask import current_app, session

from proj.jobs import auth

ACCOUNT, NONCE, BEGAN, SEEN = (
    "proj_console_account",
    "proj_console_nonce",
    "proj_console_began",
    "proj_console_seen",
)
"""The session cookie's keys."""
IDLE_TIMEOUT = 3600.0
"""Seconds a session may go unused (``PROJ_SESSION_IDLE_TIMEOUT`` unset)."""
LIFETIME = 43200.0
"""Seconds a session lasts at most (``PROJ_SESSION_LIFETIME`` unset)."""
SEEN_GRAIN = 60.0
"""Seconds between rewrites of the cookie's last use (not every request)."""


def begin(account: auth.Account) -> None:
    """Sign ``account`` in: a new session (no fixation), carrying its nonce."""
    if account.session_nonce is None:
        account.end_sessions()  # the first session since the nonce was cleared
        auth.request_session().commit()
    now = time.time()
    session.clear()
    session.update({ACCOUNT: account.id, NONCE: account.session_nonce, BEGAN: now, SEEN: now})


def current() -> auth.Account | None:
    """The account whose session this request carries, if it is still open
    (see the module); the cookie forgets one that is not."""
    account_id, nonce = session.get(ACCOUNT), session.get(NONCE)
    began, seen = session.get(BEGAN, 0.0), session.get(SEEN, 0.0)
    if not isinstance(account_id, int) or not isinstance(nonce, str):
        return None
    now = time.time()
    config = current_app.config
    idle = float(config.get("PROJ_SESSION_IDLE_TIMEOUT", IDLE_TIMEOUT))
    lifetime = float(config.get("PROJ_SESSION_LIFETIME", LIFETIME))
    if now - float(seen) > idle or now - float(began) > lifetime:
        session.clear()
        return None
    # Looked up on every request: a removed account is out at once.
    account = auth.request_session().get(auth.Account, account_id)
    if account is None or not hmac.compare_digest(account.session_nonce or "", nonce):
        session.clear()
        return None
    if now - float(seen) > SEEN_GRAIN:
        session[SEEN] = now
    return account


def end(account: auth.Account | None) -> None:
    """Sign out: every session of ``account`` ends, this one's cookie too."""
    if account is not None:
        account.end_sessions()
        auth.request_session().commit()
    session.clear()
