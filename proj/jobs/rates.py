"""Rate limits shared by every worker: "60 charges a minute to the payment
provider", whether 1 worker runs them or 20.

A task says it with its ``rate`` option, a rate, or a key and a rate::

    @shared_task(rate="60/m")                              # the task's own
    @shared_task(rate=("provider:{provider}", "100/m"))    # per key

A rate is ``N/s``, ``N/m`` or ``N/h``, as Celery writes its own
``rate_limit``, or ``N/`` a number of those (``10/5s``: 10 in any 5
seconds). Celery's ``rate_limit`` is kept by each worker for itself, so 20
workers send 20 times as much; this one is counted in the ledger, across
the fleet. The key is a template filled as a concurrency key is
(:mod:`proj.jobs.concurrency`); without one, it is the task's name.

Each job keeps its key, limit and period in its row (``rate_key``,
``rate_limit``, ``rate_period``). Each claim of a job with a key records its
start (``job_rate_starts``, kept until it leaves the window); a worker claims
one only while fewer than the limit of its key's starts fall in the last
period (on PostgreSQL the claims of one key take turns on an advisory lock),
and hands the others back to the ledger, unrun and with no attempt counted.
The relay publishes a key's jobs only as far as its window has room, less
those already published, so the jobs over the rate wait in the ledger until
their slot, not in the broker. A retry is a start of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proj.jobs.concurrency import fill_key
from proj.jobs.errors import TaskArgumentError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
"""Seconds in each unit a rate may name."""
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smh])\s*")


@dataclass(frozen=True)
class Rate:
    """A task's shared rate limit: at most ``limit`` starts of a key in any
    ``period`` seconds."""

    key: str | Callable[[Sequence[Any], Mapping[str, Any]], str]
    limit: int
    period: float


def parse(task_name: str, rate: str) -> tuple[int, float]:
    """``rate`` (``"60/m"``, ``"10/5s"``) as a limit and a period in seconds;
    :class:`TaskArgumentError` for one that is not a rate."""
    found = _RATE.fullmatch(rate) if isinstance(rate, str) else None
    if found is None:
        raise TaskArgumentError(
            f"{task_name}: a rate is N/s, N/m or N/h, or N over a number of them "
            f"(10/5s), not {rate!r}"
        )
    limit, count, unit = found.groups()
    period = float(count or 1) * UNITS[unit]
    if int(limit) < 1 or period <= 0:
        raise TaskArgumentError(f"{task_name}: a rate allows at least 1 start in some time")
    return int(limit), period


def rate_of(task: Any) -> Rate | None:
    """``task``'s shared rate limit (its ``rate`` option), or None;
    :class:`TaskArgumentError` for one that cannot be used."""
    given = getattr(task, "rate", None) if task is not None else None
    if given is None:
        return None
    if isinstance(given, str):
        key: Any = task.name
        rate = given
    else:
        try:
            key, rate = given
        except (TypeError, ValueError):
            raise TaskArgumentError(
                f'{task.name}: rate must be a rate ("60/m") or (key, rate), not {given!r}'
            ) from None
        if not (callable(key) or isinstance(key, str)):
            raise TaskArgumentError(f"{task.name}: a rate key is a template or a function")
    return Rate(key, *parse(task.name, rate))


def row_values(
    task: Any, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """A new job's ``rate_key``, ``rate_limit`` and ``rate_period`` (None for
    a task with no shared rate)."""
    found = rate_of(task)
    if found is None:
        return {"rate_key": None, "rate_limit": None, "rate_period": None}
    return {
        "rate_key": fill_key(found.key, task_name, "rate", args, kwargs),
        "rate_limit": found.limit,
        "rate_period": found.period,
    }
