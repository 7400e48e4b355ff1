"""Test-only tasks the e2e worker subprocesses load (``--include e2e_tasks``).

Each one works through the task session, as an application task would.
Two variables arrange what the e2e tests need, and only in the worker:

- ``E2E_CONNECT_BEFORE_FORK``: the worker's main process opens a worker-tier
  connection as it imports this module, before it forks its children, as an
  application that queries at import time would;
- ``E2E_PAUSE_AFTER_CHARGE`` (seconds): the default payment gateway pauses
  after it has recorded a charge, so a test can kill the worker in the window
  between the gateway's record and the invoice's commit.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore, Reject
from sqlalchemy import text

from proj import Session, retry_on
from proj.db import worker_engine
from proj.models import User
from proj.payments import LedgerGateway, Receipt


class Flaky(Exception):
    """The error ``e2e.outcome`` retries (once)."""


@shared_task(name="e2e.create_user")
def create_user(email: str) -> int:
    """Insert a user; return its id."""
    user = User(email=email)
    Session.add(user)
    Session.flush()
    return user.id


@shared_task(name="e2e.read_email")
def read_email(user_id: int) -> str | None:
    """Read a user's email."""
    user = Session.get(User, user_id)
    return None if user is None else user.email


@shared_task(name="e2e.outcome")
@retry_on(Flaky, max_retries=1, backoff=0.01)
def outcome(kind: str, email: str) -> str:
    """Insert a user, then end as ``kind`` says: succeed, fail, retry (then
    fail), ignore or reject. Only ``succeed`` keeps the user."""
    Session.add(User(email=email))
    Session.flush()
    if kind == "fail":
        raise ValueError(f"e2e: {email} fails")
    if kind == "retry":
        raise Flaky(f"e2e: {email} is flaky")
    if kind == "ignore":
        raise Ignore()
    if kind == "reject":
        raise Reject(f"e2e: {email} rejected", requeue=False)
    return email


def _pause_after_charge(pause: float) -> None:
    charge = LedgerGateway.charge

    def charge_then_pause(self: LedgerGateway, **kwargs: Any) -> Receipt:
        receipt = charge(self, **kwargs)
        time.sleep(pause)
        return receipt

    LedgerGateway.charge = charge_then_pause  # type: ignore[method-assign]


if os.environ.get("E2E_CONNECT_BEFORE_FORK"):
    # Checked in, not closed: the children inherit a pool holding it.
    with worker_engine().connect() as connection:
        connection.execute(text("SELECT 1"))

if os.environ.get("E2E_PAUSE_AFTER_CHARGE"):
    _pause_after_charge(float(os.environ["E2E_PAUSE_AFTER_CHARGE"]))
