"""Celery's own canvas where it would wait forever on tasks that ignore
their results: refused with an error that says why.

- A chord whose header has a task that ignores its result, on a result
  backend that counts the header's results by reading them (the database
  backend, proj's default: ``chord_unlock`` polls for results never stored,
  once a second, forever), is refused when it is applied, before anything is
  sent. Redis and other backends that join natively count a header's ends
  themselves, so the chord is left alone there.
- ``.get()`` on a group's result with such a task is refused at once,
  instead of waiting for a result that will never be stored (a single
  task's ``.get()`` returns None at once, as Celery does already).

proj's canvas (:func:`proj.jobs.enqueue_on_commit`) releases each step from
the ledger and needs no stored result: that is the way to chain or gather
such tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from celery import Celery
from celery.result import AsyncResult, GroupResult, ResultSet

from proj.jobs.errors import TaskArgumentError

WHY = (
    "their results are never stored, so {what} would wait for them forever; gather them "
    "with proj.jobs.enqueue_on_commit (the ledger releases each step), or drop "
    "ignore_result on these tasks"
)


def install(celery_app: Celery) -> None:
    """Refuse, on ``celery_app``, the chords and group ``.get()`` that would wait forever."""
    app: Any = celery_app  # Celery's stubs know neither these nor the setters
    app.AsyncResult = app.subclass_with_self(NamedAsyncResult)
    app.GroupResult = app.subclass_with_self(CheckedGroupResult)
    # The backend is made on first use, from the configuration as it is then.
    make = app._get_backend

    def make_checked() -> Any:
        return _checked(celery_app, make())

    app._get_backend = make_checked
    if app._backend is not None:  # made already
        _checked(celery_app, app._backend)


def ignoring(celery_app: Celery, results: Iterable[Any]) -> list[str]:
    """The names of the tasks among ``results`` (nested groups included) whose
    results are not stored."""
    return sorted({name for name in _names(results) if _ignores(celery_app, name)})


class NamedAsyncResult(AsyncResult[Any]):
    """Celery's result, keeping the name of its task (which Celery passes,
    and drops): what a chord's header and a group are checked by."""

    def __init__(
        self,
        id: str,
        backend: Any = None,
        task_name: str | None = None,
        app: Any = None,
        parent: Any = None,
    ) -> None:
        super().__init__(id, backend=backend, app=app, parent=parent)
        self.task_name = task_name


class CheckedGroupResult(GroupResult):
    """Celery's group result, refusing ``.get()`` over tasks that ignore results."""

    app: Celery

    def get(self, *args: Any, **kwargs: Any) -> Any:
        if found := ignoring(self.app, self.results or ()):
            raise TaskArgumentError(f"{', '.join(found)}: {WHY.format(what='.get()')}")
        return super().get(*args, **kwargs)


def _checked(celery_app: Celery, backend: Any) -> Any:
    if backend.supports_native_join:
        return backend
    apply_chord = backend.apply_chord

    def apply_checked(header_result_args: Any, body: Any, **kwargs: Any) -> Any:
        if found := ignoring(celery_app, header_result_args[1]):
            raise TaskArgumentError(f"{', '.join(found)}: {WHY.format(what='a chord')}")
        return apply_chord(header_result_args, body, **kwargs)

    backend.apply_chord = apply_checked
    return backend


def _names(results: Iterable[Any]) -> Iterator[str]:
    for result in results:
        if isinstance(result, ResultSet):
            yield from _names(result.results or ())
        elif name := getattr(result, "task_name", None):
            yield str(name)


def _ignores(celery_app: Celery, name: str) -> bool:
    task = celery_app.tasks.get(name)
    if task is None:
        return False
    own = task.ignore_result
    return bool(celery_app.conf.task_ignore_result if own is None else own)
