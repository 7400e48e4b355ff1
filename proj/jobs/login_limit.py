"""Console sign-in attempts, limited per client address and per account, in
a store every web process can share.

An attempt goes ahead only when its client address and the account it names
(the email tried, whether an account has it or not) both have room under
the rate, a :mod:`limits` rate such as ``10/minute``: at most that many
attempts in any window of that length (a moving window). The address is
counted first, and an attempt refused for its address does not count against
the account, so one address cannot lock an account out by itself; many
addresses together can, for as long as they keep trying. That is the price
of stopping a guess spread over many addresses.

Where attempts are counted (:data:`DATABASE`, or a :mod:`limits` storage URI;
see :func:`check_store`):

- ``database``: the ledger's ``proj_login_attempts`` table
  (:class:`~proj.jobs.auth.LoginAttempt`), one row for each attempt let
  through, kept while it counts. Every process on the database shares it;
- ``redis://``, ``rediss://`` (and ``redis+unix://``, ``redis+sentinel://``,
  ``redis+cluster://``): a Redis every process shares;
- ``memory://``: each process counts its own.

The client address is the request's ``remote_addr``: the socket's peer,
unless the application trusts its proxies' ``X-Forwarded-For`` (Werkzeug's
``ProxyFix``; the reference application's ``PROJ_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol
from urllib.parse import urlsplit

from limits import RateLimitItem
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from proj.jobs.auth import LoginAttempt
from proj.jobs.clock import utcnow
from proj.jobs.errors import ConfigurationError

DATABASE = "database"
"""The store that counts in the ledger's own table."""
MEMORY = "memory://"
"""The store that counts in each process's memory."""
SHARED_SCHEMES = frozenset({"redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"})
"""The :mod:`limits` storage schemes proj counts in, besides ``memory``: Redis's,
which keep a moving window and whose client proj ships."""
STORE_TIMEOUT = 2.0
"""Seconds a Redis store may take to answer before the attempt fails (503)."""
NAMESPACE = "proj-console-login"
PRUNE_BATCH = 100
"""Rows that stopped counting deleted at most by each attempt (any key's)."""


def check_store(uri: str) -> str:
    """``uri`` if sign-in attempts can be counted there; else
    :class:`ConfigurationError` saying what can (never echoing the URI,
    which may hold a password)."""
    scheme = urlsplit(uri).scheme
    if uri == DATABASE or scheme == "memory" or scheme in SHARED_SCHEMES:
        return uri
    raise ConfigurationError(
        f"cannot count sign-in attempts in a {scheme or 'plain'!r} store: "
        "give database, memory:// or a redis:// or rediss:// URL"
    )


def default_store(database_url: str) -> str:
    """Where attempts are counted when nothing says: the database, but on
    SQLite each process's memory (the embedded setup serves the web from one
    process, and SQLite has one writer at a time)."""
    return MEMORY if database_url.startswith("sqlite") else DATABASE


class Counter(Protocol):
    """Counts attempts under keys, each in a moving window."""

    def hit(self, key: str) -> bool:
        """Count an attempt under ``key`` if it has room; False (and nothing
        counted) if it has none."""
        ...


class StorageCounter:
    """Counts in a :mod:`limits` storage (``memory://``, ``redis://``...).
    A store that does not answer raises :class:`limits.errors.StorageError`."""

    def __init__(self, uri: str, rate: RateLimitItem) -> None:
        timeouts = (
            {"socket_timeout": STORE_TIMEOUT, "socket_connect_timeout": STORE_TIMEOUT}
            if urlsplit(uri).scheme in SHARED_SCHEMES
            else {}
        )
        storage = storage_from_string(check_store(uri), wrap_exceptions=True, **timeouts)
        self.limiter = MovingWindowRateLimiter(storage)
        self.rate = rate

    def hit(self, key: str) -> bool:
        return self.limiter.hit(self.rate, NAMESPACE, key)


class LedgerCounter:
    """Counts in the ledger's ``proj_login_attempts`` table, each attempt in a
    transaction of its own on the session ``session()`` gives (committed; an
    error rolls it back and is raised)."""

    def __init__(self, rate: RateLimitItem, session: Callable[[], Session]) -> None:
        self.rate = rate
        self.session = session

    def hit(self, key: str) -> bool:
        session = self.session()
        try:
            allowed = self._hit(session, hashlib.sha256(f"{self.rate}/{key}".encode()).hexdigest())
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return allowed

    def _hit(self, session: Session, key: str) -> bool:
        now = utcnow()
        if session.get_bind().dialect.name == "postgresql":
            # One attempt on a key at a time, in every process: the count and
            # the insert below are one step. Held until the commit.
            lock = int.from_bytes(bytes.fromhex(key[:16]), "big", signed=True)
            session.execute(select(func.pg_advisory_xact_lock(lock)))
        # On SQLite this first write takes the database's write lock, which
        # does the same. Rows another attempt is deleting are left to it.
        stale = (
            select(LoginAttempt.id)
            .where(LoginAttempt.expires_at <= now)
            .limit(PRUNE_BATCH)
            .with_for_update(skip_locked=True)
        )
        session.execute(
            delete(LoginAttempt)
            .where(LoginAttempt.id.in_(stale.scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        counted = session.scalar(
            select(func.count())
            .select_from(LoginAttempt)
            .where(LoginAttempt.key == key, LoginAttempt.expires_at > now)
        )
        if (counted or 0) >= self.rate.amount:
            return False
        window = timedelta(seconds=self.rate.get_expiry())
        session.add(LoginAttempt(key=key, expires_at=now + window))
        return True


@dataclass(frozen=True)
class LoginLimit:
    """The sign-in limit: a rate, counted per address and per account."""

    counter: Counter
    rate: RateLimitItem
    """Attempts allowed in a window, per address and per account."""

    def refusal(self, address: str, email: str) -> str | None:
        """Count an attempt from ``address`` on the account of ``email``:
        None when both had room, else which had none (``"address"`` or
        ``"account"``). Raises what the store raises when it does not answer."""
        if not self.counter.hit(_key("address", address)):
            return "address"
        if not self.counter.hit(_key("account", email.strip().lower())):
            return "account"
        return None


def _key(kind: str, value: str) -> str:
    # Hashed: no email (or anything typed in its place) lands in the store,
    # and every key has one length.
    return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()}"


def login_limit(uri: str, rate: RateLimitItem, session: Callable[[], Session]) -> LoginLimit:
    """The limit of ``rate`` counted in ``uri`` (see :func:`check_store`);
    ``session`` gives the session the ``database`` store writes with."""
    if check_store(uri) == DATABASE:
        return LoginLimit(LedgerCounter(rate, session), rate)
    return LoginLimit(StorageCounter(uri, rate), rate)
