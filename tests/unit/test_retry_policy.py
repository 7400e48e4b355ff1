"""RetryPolicy's countdowns and which errors TRANSIENT_ERRORS calls transient (no services)."""

from __future__ import annotations

import smtplib

import kombu.exceptions
import pytest
from sqlalchemy import exc as sa_exc

from proj.jobs.retry import TRANSIENT_ERRORS, RetryPolicy, retry_on, retry_policy_of


class Hiccup(Exception):
    """An error the policies under test name."""


def policy(*, jitter: bool, backoff: float = 0.5, max_backoff: float = 3.0) -> RetryPolicy:
    return RetryPolicy(
        (Hiccup,), max_retries=5, backoff=backoff, max_backoff=max_backoff, jitter=jitter
    )


def test_countdown_without_jitter_doubles_up_to_the_cap() -> None:
    """Retry n waits backoff * 2**n, never more than max_backoff."""
    assert [policy(jitter=False).countdown(n) for n in range(6)] == [0.5, 1, 2, 3, 3, 3]


def test_countdown_stays_capped_however_many_retries() -> None:
    """A task retried thousands of times still waits max_backoff, not an overflow."""
    assert policy(jitter=False).countdown(5000) == 3.0
    assert 0 <= policy(jitter=True).countdown(5000) <= 3.0


def test_countdown_with_jitter_spreads_over_zero_to_the_ceiling() -> None:
    """Full jitter: any share of the ceiling, and a real spread of values."""
    samples = [policy(jitter=True).countdown(2) for _ in range(300)]
    assert all(0 <= s <= 2.0 for s in samples)
    assert max(samples) - min(samples) > 1.0
    capped = [policy(jitter=True).countdown(10) for _ in range(300)]
    assert all(0 <= s <= 3.0 for s in capped)
    assert max(capped) > 2.0


def test_policy_matches_only_the_errors_named() -> None:
    """A named class and its subclasses retry; anything else does not."""

    class Smaller(Hiccup):
        pass

    named = policy(jitter=False)
    assert named.matches(Hiccup()) and named.matches(Smaller())
    assert not named.matches(ValueError())
    transient = RetryPolicy((TRANSIENT_ERRORS,), 1, 1.0, 1.0, jitter=False)
    assert transient.matches(ConnectionResetError())
    assert not transient.matches(Hiccup())


@pytest.mark.parametrize(
    "error",
    [
        kombu.exceptions.OperationalError("broker unreachable"),
        ConnectionError("reset"),
        ConnectionRefusedError("refused"),
        TimeoutError("timed out"),
        sa_exc.TimeoutError("QueuePool limit reached"),
        sa_exc.DisconnectionError("gone"),
        smtplib.SMTPServerDisconnected("bye"),
        smtplib.SMTPResponseException(421, b"service not available, try later"),
        smtplib.SMTPSenderRefused(451, b"temporary failure", "proj@localhost"),
    ],
    ids=repr,
)
def test_transient(error: BaseException) -> None:
    """Lost brokers, networks and SMTP's 4xx replies heal by themselves."""
    assert error in TRANSIENT_ERRORS


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad input"),
        KeyError("missing"),
        smtplib.SMTPResponseException(550, b"no such mailbox"),
        smtplib.SMTPSenderRefused(553, b"sender refused", "proj@localhost"),
        smtplib.SMTPRecipientsRefused({"x@example.com": (550, b"unknown")}),
        kombu.exceptions.EncodeError("not JSON"),
    ],
    ids=repr,
)
def test_not_transient(error: BaseException) -> None:
    """Bugs, bad data and SMTP's 5xx replies fail at once."""
    assert error not in TRANSIENT_ERRORS


def test_transient_errors_ignore_what_is_not_an_exception() -> None:
    """Only exceptions can be transient."""
    assert ConnectionError not in TRANSIENT_ERRORS
    assert "ConnectionError" not in TRANSIENT_ERRORS


def test_retry_on_records_its_policy_and_needs_an_error() -> None:
    """retry_on keeps its settings where proj's checks find them, and refuses no errors."""

    @retry_on(Hiccup, max_retries=2, backoff=0.1, max_backoff=0.3, jitter=False)
    def work(item_id: int) -> int:
        return item_id

    class Task:
        run = work

    found = retry_policy_of(Task())  # type: ignore[arg-type]
    assert found == RetryPolicy((Hiccup,), 2, 0.1, 0.3, jitter=False)
    assert work(7) == 7
    with pytest.raises(TypeError, match="at least one exception"):
        retry_on()
