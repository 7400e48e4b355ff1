"""The reference application's tables: users and their invoices."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from proj.db import Base
from proj.jobs import UtcDateTime, utcnow

MAX_ID = 2**31 - 1
"""Largest id a table here can hold (ids above it cannot exist)."""


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


class User(Base):
    """Someone who signed up; ``welcomed_at`` is set once the welcome mail is sent."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    welcomed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "created_at": iso(self.created_at),
            "welcomed_at": iso(self.welcomed_at),
        }


class Invoice(Base):
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
        }
