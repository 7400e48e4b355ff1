"""Time as the ledger keeps it: aware UTC datetimes, on every database."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, TypeDecorator


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC (what every timestamp column holds)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database (SQLite included)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def parse_eta(value: datetime | str) -> datetime:
    """An ETA as an aware datetime (ISO strings and naive datetimes are UTC)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def due_at(options: Mapping[str, Any], now: datetime | None = None) -> datetime | None:
    """When publishing ``options`` (``eta`` or ``countdown``) say the task may
    start; None when they say nothing."""
    if options.get("eta") is not None:
        return parse_eta(options["eta"])
    if options.get("countdown") is not None:
        return (now or utcnow()) + timedelta(seconds=float(options["countdown"]))
    return None
