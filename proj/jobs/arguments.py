"""Task arguments must be JSON values: ids, not ORM objects."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from kombu.utils.json import dumps
from sqlalchemy import inspect
from sqlalchemy.exc import NoInspectionAvailable

from proj.jobs.errors import TaskArgumentError


def argument_message(task_name: str, problem: str) -> str:
    return (
        f"{task_name}: {problem}. Task arguments must be JSON values "
        "(ids, strings, numbers, lists, dicts): pass the object's id "
        "and load it inside the task."
    )


_CIRCULAR = object()
"""What :func:`_walk` yields for a container found inside itself."""


def _walk(value: Any, containers: frozenset[int] = frozenset()) -> Iterator[Any]:
    if id(value) in containers:
        yield _CIRCULAR
        return
    yield value
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        return
    inside = containers | {id(value)}
    for item in items:
        yield from _walk(item, inside)


def check_arguments(
    task_name: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> None:
    """Raise :class:`TaskArgumentError` if an argument is an ORM object, or
    contains itself (which no serializer can write)."""
    for value in _walk([args or (), kwargs or {}]):
        if value is _CIRCULAR:
            raise TaskArgumentError(argument_message(task_name, "an argument contains itself"))
        if hasattr(value, "_sa_instance_state"):
            try:
                identity = inspect(value).identity
            except NoInspectionAvailable:  # pragma: no cover - defensive
                identity = None
            name = type(value).__name__
            hint = f" (id {identity[0]!r})" if identity and len(identity) == 1 else ""
            raise TaskArgumentError(argument_message(task_name, f"got a {name} object{hint}"))


def check_json(
    task_name: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> None:
    """Raise :class:`TaskArgumentError` if the arguments do not encode as JSON."""
    try:
        dumps([args or (), kwargs or {}])
    except (TypeError, ValueError) as exc:
        raise TaskArgumentError(argument_message(task_name, str(exc))) from exc


def encoded_size(
    task_name: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> int:
    """The bytes the arguments take as JSON. If they cannot be encoded, raise
    :class:`TaskArgumentError` saying why: an ORM object, a container inside
    itself (:func:`check_arguments`), or what the encoder refused."""
    try:
        return len(dumps([args or (), kwargs or {}]))
    except (TypeError, ValueError) as exc:
        check_arguments(task_name, args, kwargs)
        raise TaskArgumentError(argument_message(task_name, str(exc))) from exc
