"""How the overview, periodic and workers pages word times, durations and
rates (always UTC: the ledger's time)."""

from __future__ import annotations

from datetime import UTC, datetime

UNITS = ((86_400, "d"), (3_600, "h"), (60, "min"), (1, "s"))


def duration(seconds: float) -> str:
    """``seconds`` in its two largest units: ``42 s``, ``3 min 5 s``, ``2 h``, ``1 d 4 h``."""
    left = max(round(seconds), 0)
    parts: list[str] = []
    for size, unit in UNITS:
        amount, left = divmod(left, size)
        if amount or parts:
            parts.append(f"{amount} {unit}")
        if len(parts) == 2:
            break
    if not parts:
        return "0 s"
    return " ".join(part for part in parts if not part.startswith("0 "))


def moment(at: datetime | None) -> str:
    """``at`` as ``2025-01-31 14:05:09 UTC`` (a dash for none)."""
    if at is None:
        return "—"
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock(at: datetime) -> str:
    """``at``'s time of day, ``14:05`` (UTC)."""
    return at.astimezone(UTC).strftime("%H:%M")


def percent(fraction: float | None) -> str:
    """``fraction`` as ``3.2 %`` (a dash for none)."""
    return "—" if fraction is None else f"{fraction * 100:.1f} %"
