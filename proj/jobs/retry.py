"""``retry_on``: retry only the errors named, with backoff; fail fast on the rest.

``TRANSIENT_ERRORS`` names the errors that heal by themselves: database errors
recognised by SQLSTATE or by an invalidated connection (not only by class), a
database server the driver cannot reach, SQLite's busy or locked database, lost
broker, network or SMTP connections, and SMTP's "try again later" (4xx)
replies. An integrity error is never transient.
"""

from __future__ import annotations

import functools
import inspect
import random
import smtplib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import kombu.exceptions
from celery import Task, current_task
from sqlalchemy import exc as sa_exc

RETRY_POLICY_ATTR = "retry_policy"

F = TypeVar("F", bound=Callable[..., Any])


class TransientErrors:
    """Recognises errors worth retrying: by class, and by what a database says."""

    SQLSTATES = frozenset(
        {
            "40001",  # serialization_failure
            "40P01",  # deadlock_detected
            "55P03",  # lock_not_available
            "53300",  # too_many_connections
            "53400",  # configuration_limit_exceeded
            "57P01",  # admin_shutdown
            "57P02",  # crash_shutdown
            "57P03",  # cannot_connect_now
            "57014",  # query_canceled (statement or lock timeout)
        }
    )
    SQLSTATE_CLASSES = frozenset({"08"})  # connection exceptions
    SQLITE_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED

    def __init__(self, *classes: type[BaseException]) -> None:
        self.classes = classes

    def __contains__(self, exc: object) -> bool:
        if not isinstance(exc, BaseException):
            return False
        if isinstance(exc, sa_exc.IntegrityError):
            return False
        if isinstance(exc, sa_exc.DBAPIError):
            return exc.connection_invalidated or self._database_says_transient(exc)
        if isinstance(exc, smtplib.SMTPResponseException):
            return 400 <= exc.smtp_code < 500  # 4xx: try again later
        return isinstance(exc, self.classes)

    def _database_says_transient(self, exc: sa_exc.DBAPIError) -> bool:
        orig = exc.orig
        sqlstate = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
        if sqlstate:
            return sqlstate in self.SQLSTATES or sqlstate[:2] in self.SQLSTATE_CLASSES
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None:
            # Extended codes keep the primary one in the low byte
            # (SQLITE_BUSY_SNAPSHOT is 517, SQLITE_BUSY 5).
            return (code & 0xFF) in self.SQLITE_CODES
        # No SQLSTATE from a server database: the driver could not connect
        # (refused, reset, timed out, server starting up). psycopg2 cannot
        # tell a bad password or database name apart from these, so those
        # are retried too before they end as dead letters.
        return isinstance(exc, sa_exc.OperationalError)

    def __repr__(self) -> str:
        return f"TransientErrors({', '.join(c.__name__ for c in self.classes)})"


TRANSIENT_ERRORS = TransientErrors(
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no connection free in the pool in time
    kombu.exceptions.OperationalError,  # broker unreachable while publishing
    ConnectionError,
    TimeoutError,
    socket.timeout,
    smtplib.SMTPServerDisconnected,
)
"""The errors that heal by themselves: ``@retry_on(TRANSIENT_ERRORS)``."""

ErrorSpec = type[BaseException] | TransientErrors


def backoff(retries: int, *, base: float, cap: float, jitter: bool = True) -> float:
    """Seconds to wait before try number ``retries + 1``: ``base * 2**retries``,
    capped at ``cap``; with ``jitter``, a random share of that (full jitter).
    The one backoff rule of proj.jobs (task retries, claims, ledger writes)."""
    # Past 2**64 every ceiling is the cap; a bigger power would overflow a float.
    ceiling = min(cap, base * 2.0 ** min(retries, 64))
    # Jitter spreads retries out; nothing about it needs to be unpredictable.
    return random.uniform(0, ceiling) if jitter else ceiling  # noqa: S311


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a task is retried. Made by :func:`retry_on`."""

    errors: tuple[ErrorSpec, ...]
    max_retries: int
    backoff: float
    max_backoff: float
    jitter: bool

    def matches(self, exc: BaseException) -> bool:
        """True if ``exc`` is one of the errors this policy retries."""
        for spec in self.errors:
            if isinstance(spec, TransientErrors):
                if exc in spec:
                    return True
            elif isinstance(exc, spec):
                return True
        return False

    def countdown(self, retries: int) -> float:
        """Seconds to wait before retry number ``retries + 1``."""
        return backoff(retries, base=self.backoff, cap=self.max_backoff, jitter=self.jitter)

    def retry(self, task: Task[Any, Any], exc: Exception) -> NoReturn:
        """Schedule the next attempt (a :class:`~proj.jobs.SqlAlchemyTask`
        rolls its session back first).

        Raises ``exc`` itself once ``max_retries`` retries have been made.
        """
        raise task.retry(
            exc=exc,
            countdown=self.countdown(task.request.retries),
            max_retries=self.max_retries,
        )


def retry_on(
    *errors: ErrorSpec,
    max_retries: int = 5,
    backoff: float = 1.0,
    max_backoff: float = 600.0,
    jitter: bool = True,
) -> Callable[[F], F]:
    """Retry the decorated task on the errors named, and only on those.

    Put it below ``@app.task`` (or ``@shared_task``)::

        @shared_task
        @retry_on(TRANSIENT_ERRORS, max_retries=8)
        def charge_invoice(invoice_id): ...

    Attempt ``n`` waits up to ``backoff * 2**n`` seconds, capped at
    ``max_backoff`` (a random share of it with ``jitter``). After
    ``max_retries`` retries the error is raised and the task fails; any error
    not named fails at once. On a :class:`~proj.jobs.SqlAlchemyTask`, a commit
    that fails with a named error is retried too.
    """
    if not errors:
        raise TypeError("retry_on() needs at least one exception to retry on")
    policy = RetryPolicy(errors, max_retries, backoff, max_backoff, jitter)

    def decorate(fun: F) -> F:
        @functools.wraps(fun)
        def run_with_retry(*args: Any, **kwargs: Any) -> Any:
            try:
                return fun(*args, **kwargs)
            except Exception as exc:
                if not policy.matches(exc) or not current_task:
                    raise
                policy.retry(current_task, exc)

        # Celery checks call arguments against the signature it reads here.
        run_with_retry.__signature__ = inspect.signature(fun)  # type: ignore[attr-defined]
        setattr(run_with_retry, RETRY_POLICY_ATTR, policy)
        return run_with_retry  # type: ignore[return-value]

    return decorate


def retry_policy_of(task: Task[Any, Any]) -> RetryPolicy | None:
    """The :class:`RetryPolicy` ``retry_on`` gave ``task``, if any."""
    return getattr(task.run, RETRY_POLICY_ATTR, None)


def max_attempts_of(task: Task[Any, Any], default: int) -> int:
    """How many attempts ``task``'s jobs get, the one rule for every way a job
    is made: its ``retry_on`` policy's retries + 1, else the task's own
    ``max_attempts`` attribute, else ``default`` (``PROJ_MAX_ATTEMPTS``)."""
    policy = retry_policy_of(task)
    if policy is not None:
        return policy.max_retries + 1
    own = getattr(task, "max_attempts", None)
    return int(own) if own else default
