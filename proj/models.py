"""The reference application's tables: users and their invoices.

Both belong to a tenant (:class:`TenantScoped`): on PostgreSQL, row-level
security lets a transaction see and write only its tenant's rows (migration
0003); :func:`get_for_tenant` applies the same rule in the application, which
is all there is on SQLite and for roles that bypass row-level security.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, Session, mapped_column, scoped_session

from proj.db import Base
from proj.jobs import UtcDateTime, utcnow
from proj.jobs.context import current_tenant

MAX_ID = 2**31 - 1
"""Largest id a table here can hold (ids above it cannot exist)."""


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


TENANT_TABLES = ("users", "invoices", "gateway_charges")
"""The tables whose rows belong to a tenant (row-level security on PostgreSQL)."""


class TenantScoped:
    """A row that belongs to a tenant: the one current when it was made
    (:func:`proj.jobs.context.current_tenant`), or none (NULL) where
    tenants are not used."""

    tenant: Mapped[str | None] = mapped_column(String(64), default=current_tenant)


Scoped = TypeVar("Scoped", bound=TenantScoped)


def get_for_tenant(
    session: Session | scoped_session[Any],
    model: type[Scoped],
    ident: int,
    *,
    with_for_update: bool = False,
) -> Scoped | None:
    """The ``model`` row with id ``ident`` if it is the current tenant's (with
    no tenant: if it has none), else None, as if it did not exist."""
    found = session.get(model, ident, with_for_update=with_for_update)
    return found if found is not None and found.tenant == current_tenant() else None


class User(TenantScoped, Base):
    """Someone who signed up; ``welcomed_at`` is set once the welcome mail is sent.

    An email signs up once per tenant (and once among users with no tenant)."""

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("tenant", "email", name="uq_users_tenant_email"),
        # NULLs are distinct in a unique constraint: untenanted users need their own.
        Index(
            "uq_users_email_untenanted",
            "email",
            unique=True,
            postgresql_where=text("tenant IS NULL"),
            sqlite_where=text("tenant IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    welcomed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "created_at": iso(self.created_at),
            "welcomed_at": iso(self.welcomed_at),
        }


class Invoice(TenantScoped, Base):
    """An amount a user owes; charged at most once, through the payment gateway."""

    __tablename__ = "invoices"
    __table_args__ = (CheckConstraint("amount_cents > 0", name="amount_positive"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    amount_cents: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="open")
    """``open``, then ``charged``."""
    charge_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    charged_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    receipt_sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    """When its receipt was mailed (once, after its charge)."""

    @property
    def idempotency_key(self) -> str:
        """The key every charge of this invoice goes to the gateway with."""
        return f"invoice-{self.id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "amount_cents": self.amount_cents,
            "status": self.status,
            "charge_id": self.charge_id,
            "created_at": iso(self.created_at),
            "charged_at": iso(self.charged_at),
            "receipt_sent_at": iso(self.receipt_sent_at),
        }
