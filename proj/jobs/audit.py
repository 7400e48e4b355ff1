"""The audit trail: who retried or cancelled jobs, paused or resumed a
queue, signed in to the console (or tried to), signed out, or changed a
token or an account; when, from where, and what it touched. One row an
action, in the ledger's ``proj_audit`` table (:class:`AuditEntry`).

:func:`record` writes an entry in the transaction of the action it records,
so the entry is kept if and only if the action is: an action rolled back,
or refused before it changed anything, leaves none. The job API, the
console and the commands of :mod:`proj.jobs.cli` record what they do; the
functions they call (:func:`proj.jobs.actions.retry`,
:func:`proj.jobs.auth.add_token`, ...) record nothing themselves, as they
do not know who asked.

An entry's ``actor`` is ``token:<name>`` (an API token), ``account:<email>``
(a console account), ``cli`` (a command, whoever ran it: the login name it
ran under is in the detail) or ``anonymous`` (a failed sign-in). Its
``tenant`` is the acting token's: console accounts and commands act for no
tenant. Its ``address`` is the client's as the application sees it
(``request.remote_addr``: behind Werkzeug's ``ProxyFix``, the address the
trusted proxies saw).

Entries older than ``PROJ_RETENTION_DAYS`` are deleted with the finished
jobs (:meth:`proj.jobs.Jobs.prune`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from flask import g, request
from sqlalchemy import JSON, ColumnElement, Engine, Index, String, Table, delete, insert, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from proj.jobs.auth import token_tenant
from proj.jobs.clock import UtcDateTime, utcnow
from proj.jobs.models import LedgerBase, iso, jsonable

ANONYMOUS = "anonymous"
"""The actor of a request that is nobody's (a failed sign-in)."""
CLI = "cli"
"""The actor of a command."""
ACTOR_LENGTH = TARGET_LENGTH = 400
"""Characters of an actor or a target kept (``account:`` and a 320-character email fit)."""
ADDRESS_LENGTH = 64
"""Characters of a client address kept (an IPv6 address takes at most 45)."""
MAX_ID = 2**63 - 1
"""The largest entry id a page may start after (what every database compares)."""


class Action(StrEnum):
    """What an entry records, and what its ``target`` names."""

    JOB_RETRY = "job.retry"
    """A failed job queued again (the job's id)."""
    JOB_CANCEL = "job.cancel"
    """A job cancelled, or asked to stop (the job's id; ``was``: its state before)."""
    JOBS_BULK_RETRY = "jobs.bulk_retry"
    """The console's retry of many jobs (how many were retried; the counts and
    the filter in the detail)."""
    JOBS_BULK_CANCEL = "jobs.bulk_cancel"
    """The console's cancel of many jobs (how many were cancelled or asked to stop)."""
    SIGN_IN = "session.sign_in"
    """A console sign-in (the actor is the account)."""
    SIGN_IN_FAILED = "session.sign_in_failed"
    """A console sign-in whose password did not match (the account's email, if
    one has it: the text typed is never kept, as it may be a password)."""
    SIGN_OUT = "session.sign_out"
    """A console sign-out: every session of the account ended."""
    TOKEN_ADD = "token.add"  # noqa: S105  (an action's name, not a secret)
    """An API token made (its name; its role, tenant and expiry in the detail)."""
    TOKEN_REVOKE = "token.revoke"  # noqa: S105  (an action's name, not a secret)
    """An API token revoked (its name)."""
    ACCOUNT_ADD = "account.add"
    """A console account made (its email; its role in the detail)."""
    ACCOUNT_PASSWORD = "account.password"  # noqa: S105  (an action's name, not a secret)
    """A console account's new password (its email)."""
    ACCOUNT_REMOVE = "account.remove"
    """A console account removed (its email)."""
    QUEUE_PAUSE = "queue.pause"
    """A queue paused (its name): its jobs wait until it is resumed."""
    QUEUE_RESUME = "queue.resume"
    """A paused queue resumed (its name)."""


class AuditEntry(LedgerBase):
    """One action of the audit trail: who did what, to what, when, from where."""

    __tablename__ = "proj_audit"
    __table_args__ = (
        # A tenant's token reads its own entries, newest first.
        Index("ix_proj_audit_tenant_id", "tenant", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    """Grows with every entry: newest first is highest first."""
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    """``token:<name>``, ``account:<email>``, ``cli`` or ``anonymous``."""
    action: Mapped[str] = mapped_column(String(64))
    """One of :class:`Action`."""
    target: Mapped[str | None] = mapped_column(String(TARGET_LENGTH))
    """What it was done to: a job's id, a number of jobs, a token's name, an email."""
    tenant: Mapped[str | None] = mapped_column(String(64))
    """The acting token's tenant (None: no tenant's)."""
    address: Mapped[str | None] = mapped_column(String(ADDRESS_LENGTH))
    """The client's address (None: a command)."""
    detail: Mapped[Any | None] = mapped_column(JSON)
    """What else there is to say, as a JSON object."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": iso(self.at),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "tenant": self.tenant,
            "address": self.address,
            "detail": self.detail,
        }


AUDIT = cast(Table, AuditEntry.__table__)


def record(
    where: Session | Engine,
    action: Action,
    *,
    actor: str,
    target: str | None = None,
    tenant: str | None = None,
    address: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Write an entry: in the session's transaction (kept only if it
    commits), or on an engine in a transaction of its own. Text longer than
    its column is cut; ``detail`` is kept as JSON (what is not JSON, as its
    repr)."""
    statement = insert(AUDIT).values(
        at=utcnow(),
        actor=actor[:ACTOR_LENGTH],
        action=str(action),
        target=None if target is None else target[:TARGET_LENGTH],
        tenant=tenant,
        address=None if address is None else address[:ADDRESS_LENGTH],
        detail=jsonable(dict(detail)) if detail else None,
    )
    if not isinstance(where, Engine):
        where.execute(statement)
        return
    with where.begin() as connection:
        connection.execute(statement)


def token_actor(name: str) -> str:
    """The actor that is the API token named ``name``."""
    return f"token:{name}"


def account_actor(email: str) -> str:
    """The actor that is the console account of ``email``."""
    return f"account:{email}"


def requester() -> str:
    """Who the current request acts as: its API token, else its console
    account, else :data:`ANONYMOUS`."""
    token = g.get("proj_token")
    if token is not None:
        return token_actor(token.name)
    account = g.get("console_account")
    if account is not None:
        return account_actor(account.email)
    return ANONYMOUS


def record_request(
    session: Session,
    action: Action,
    *,
    target: str | None = None,
    detail: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> None:
    """:func:`record` for the current Flask request, in ``session``'s
    transaction: by ``actor`` (default: :func:`requester`), for the token's
    tenant, from the client's address."""
    record(
        session,
        action,
        actor=actor or requester(),
        target=target,
        tenant=token_tenant(),
        address=request.remote_addr,
        detail=detail,
    )


def of_tenant(tenant: str | None) -> ColumnElement[bool]:
    """The condition of the entries of ``tenant`` (None: of no tenant)."""
    return AuditEntry.tenant.is_(None) if tenant is None else AuditEntry.tenant == tenant


@dataclass(frozen=True)
class Page:
    """Entries, newest first, and where the next page starts."""

    entries: list[AuditEntry]
    older: int | None
    """The ``before`` of the next page (None: this one is the last)."""


def page(
    session: Session, limit: int, before: int | None = None, *where: ColumnElement[bool]
) -> Page:
    """Up to ``limit`` entries meeting ``where``, newest first, older than
    the entry ``before`` (an id) when given."""
    query = select(AuditEntry).where(*where).order_by(AuditEntry.id.desc()).limit(limit + 1)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    found = list(session.scalars(query))
    entries = found[:limit]
    return Page(entries, entries[-1].id if len(found) > limit else None)


def prune(session: Session, before: datetime) -> int:
    """Delete, in ``session``'s transaction, the entries written before
    ``before``; how many."""
    result = session.execute(delete(AuditEntry).where(AuditEntry.at < before))
    return int(getattr(result, "rowcount", 0) or 0)
