"""``SqlAlchemyTask``: how a Celery task meets the database.

Each run gets a session of its own (``proj.db.Session`` resolves to it, and
``self.session`` is it). When the run returns, the session is committed before
Celery reports success; when it raises (including retry, ignore and reject),
it is rolled back. Either way it is closed and removed, so the connection goes
back to the pool before the worker takes the next message.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import celery
from billiard.einfo import ExceptionInfo
from kombu.exceptions import EncodeError
from kombu.utils.json import dumps
from sqlalchemy import inspect, orm
from sqlalchemy.exc import NoInspectionAvailable

from proj.db import Session, task_scope
from proj.deadletter import record_dead_letter
from proj.errors import TaskArgumentError
from proj.retry import retry_policy_of
from proj.safety import check_countdown

_runs = itertools.count()
SESSION_KEY = "proj_session_key"
"""Where a traced run leaves its session's key on the request, for ``after_return``."""


class SqlAlchemyTask(celery.Task[Any, Any]):
    """A Celery task base that runs each task in a unit of work.

    - one session per run, scoped by the running task: concurrent runs on the
      threads pool, and a run called eagerly or directly from a web request
      or another task, never share a session or touch their caller's;
    - commit before success (a failed commit fails the task, and is retried
      if ``retry_on`` names the error); rollback on any exception;
    - the session removed whatever way the run ends;
    - arguments checked at enqueue time: an ORM object is refused with an
      error that says to pass its id;
    - a final failure recorded as a dead letter.
    """

    @property
    def session(self) -> orm.Session:
        """The session of the run in progress."""
        return Session()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A key of its own for every run, not the task id: a message delivered
        # twice runs twice at once, and each run must have its own session.
        key = f"{self.request.id}/{next(_runs)}"
        if not self.request.called_directly:
            setattr(self.request, SESSION_KEY, key)  # for after_return
        with task_scope(key):
            try:
                retval = super().__call__(*args, **kwargs)
                if Session.registry.has():
                    self._commit()
                return retval
            except BaseException:
                if Session.registry.has():
                    Session.rollback()
                raise
            finally:
                Session.remove()

    def _commit(self) -> None:
        try:
            Session.commit()
        except Exception as exc:
            policy = retry_policy_of(self)
            if policy is not None and policy.matches(exc):
                policy.retry(self, exc)
            raise

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo | None,
    ) -> None:
        """Remove the run's scoped session (``__call__`` has removed it already
        on every path, including retry, ignore and reject, which Celery does
        not pass through here; this keeps a subclass's run from leaking)."""
        key = getattr(self.request, SESSION_KEY, None)
        if key is not None:
            with task_scope(key):
                Session.remove()

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        """Record the failure as a dead letter."""
        record_dead_letter(
            task_name=self.name,
            task_id=task_id,
            reason="failed",
            arguments={"args": list(args or ()), "kwargs": dict(kwargs or {})},
            exception=exc,
            traceback=str(einfo.traceback) if einfo else None,
            attempts=(self.request.retries or 0) + 1,
        )

    def apply_async(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Enqueue the task; refuse arguments that cannot cross the queue."""
        check_arguments(self.name, args, kwargs)
        check_countdown(self.app, options)
        if self.app.conf.task_always_eager:
            _check_json(self.name, args, kwargs)
        try:
            return super().apply_async(tuple(args or ()), dict(kwargs or {}), **options)
        except EncodeError as exc:
            raise TaskArgumentError(_argument_message(self.name, str(exc))) from exc


def _argument_message(task_name: str, problem: str) -> str:
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
            raise TaskArgumentError(_argument_message(task_name, "an argument contains itself"))
        if hasattr(value, "_sa_instance_state"):
            try:
                identity = inspect(value).identity
            except NoInspectionAvailable:  # pragma: no cover - defensive
                identity = None
            name = type(value).__name__
            hint = f" (id {identity[0]!r})" if identity and len(identity) == 1 else ""
            raise TaskArgumentError(_argument_message(task_name, f"got a {name} object{hint}"))


def _check_json(
    task_name: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> None:
    try:
        dumps([args or (), kwargs or {}])
    except (TypeError, ValueError) as exc:
        raise TaskArgumentError(_argument_message(task_name, str(exc))) from exc
