"""Payment gateways. Every charge carries an idempotency key, and a gateway
charges a key once however often it is asked (as Stripe and others do)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from proj.config import current_settings
from proj.db import Base, session_scope
from proj.jobs import UtcDateTime, utcnow
from proj.models import TenantScoped


@dataclass(frozen=True)
class Receipt:
    """What a gateway answers for a charge."""

    charge_id: str
    idempotency_key: str
    amount_cents: int
    created_at: datetime


class PaymentGateway(Protocol):
    """What charges a customer: once per idempotency key, however often asked."""

    def charge(self, *, idempotency_key: str, amount_cents: int) -> Receipt:
        """Charge once per key; asking again with the key returns the first receipt."""
        ...


class LedgerCharge(TenantScoped, Base):
    """The default gateway's own ledger: one row per idempotency key, in the
    tenant of the charge (a tenant sees its own charges only)."""

    __tablename__ = "gateway_charges"

    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    charge_id: Mapped[str] = mapped_column(String(64), unique=True)
    amount_cents: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    def receipt(self) -> Receipt:
        return Receipt(self.charge_id, self.idempotency_key, self.amount_cents, self.created_at)


class LedgerGateway:
    """A gateway that records charges in its ledger table, in a transaction of
    its own (as a remote gateway would: its record does not roll back with ours)."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency

    def charge(self, *, idempotency_key: str, amount_cents: int) -> Receipt:
        time.sleep(self.latency)
        try:
            with session_scope() as session:
                row = LedgerCharge(
                    idempotency_key=idempotency_key,
                    charge_id=f"ch_{uuid.uuid4().hex[:24]}",
                    amount_cents=amount_cents,
                )
                session.add(row)
                session.flush()
                return row.receipt()
        except IntegrityError:
            with session_scope() as session:
                query = select(LedgerCharge).filter_by(idempotency_key=idempotency_key)
                return session.scalars(query).one().receipt()


def default_gateway() -> PaymentGateway:
    """The gateway the settings name (the ledger gateway)."""
    return LedgerGateway(latency=current_settings().payment_latency)
