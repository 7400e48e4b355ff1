"""Concurrency limits per key: "at most 2 charges per merchant at once",
across every worker.

A task says it with its ``concurrency`` option, a key and a limit::

    @shared_task(bind=True, concurrency=("merchant:{merchant_id}", 2))
    def charge(self, invoice_id, merchant_id): ...

The key is a template filled with the call's keyword arguments, and its
positional ones by index (``{0}``), or a function given the call's
``args`` and ``kwargs``. Each job keeps its key and limit in its row
(``concurrency_key``, ``concurrency_limit``). A worker claims a keyed job
only while fewer than the limit of its key's jobs run (on PostgreSQL the
claims of one key take turns on an advisory lock; SQLite's writes take
turns anyway); one over the limit is handed back to the ledger, unrun and
with no attempt counted. The relay publishes a key's jobs only into its
free slots, so the jobs over the limit wait in the ledger, not in the
broker; a job's run, as it ends, publishes the next of its key (a failed
one's slot waits for the relay's next pass), and a lost worker's slot comes
back when the reconciler takes its job back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proj.jobs.errors import TaskArgumentError

KEY_LIMIT = 255
"""Characters of a key kept (the column's)."""


@dataclass(frozen=True)
class Concurrency:
    """A task's concurrency limit: its key (a template or a function) and limit."""

    key: str | Callable[[Sequence[Any], Mapping[str, Any]], str]
    limit: int

    def key_for(self, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The key of a call with ``args`` and ``kwargs``; :class:`TaskArgumentError`
        if the template names an argument the call does not have."""
        return fill_key(self.key, task_name, "concurrency", args, kwargs)


def fill_key(
    key: str | Callable[[Sequence[Any], Mapping[str, Any]], str],
    task_name: str,
    option: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> str:
    """``key`` (a template or a function) filled for a call with ``args`` and
    ``kwargs``, cut at :data:`KEY_LIMIT`; :class:`TaskArgumentError` naming
    the task's ``option`` if the template names an argument the call lacks."""
    try:
        made = str(key(args, kwargs)) if callable(key) else key.format(*args, **kwargs)
    except (IndexError, KeyError) as exc:
        raise TaskArgumentError(
            f"{task_name}: its {option} key {key!r} names {exc}, which the call does not have"
        ) from None
    return made[:KEY_LIMIT]


def concurrency_of(task: Any) -> Concurrency | None:
    """``task``'s concurrency limit (its ``concurrency`` option: a key and a
    limit), or None; :class:`TaskArgumentError` for one that cannot be used."""
    given = getattr(task, "concurrency", None) if task is not None else None
    if given is None:
        return None
    try:
        key, limit = given
    except (TypeError, ValueError):
        raise TaskArgumentError(
            f"{task.name}: concurrency must be (key, limit), not {given!r}"
        ) from None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise TaskArgumentError(f"{task.name}: a concurrency limit is a whole number from 1")
    if not (callable(key) or isinstance(key, str)):
        raise TaskArgumentError(f"{task.name}: a concurrency key is a template or a function")
    return Concurrency(key, limit)


def row_values(
    task: Any, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """A new job's ``concurrency_key`` and ``concurrency_limit`` (None for a
    task with no limit)."""
    found = concurrency_of(task)
    if found is None:
        return {"concurrency_key": None, "concurrency_limit": None}
    return {
        "concurrency_key": found.key_for(task_name, args, kwargs),
        "concurrency_limit": found.limit,
    }
