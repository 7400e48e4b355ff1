"""Sessions scoped by the running task.

A :class:`~proj.jobs.Jobs` has one scoped session (``jobs.session``) that
resolves, inside a task run, to that run's own session, and elsewhere to the
thread's. Each run has a key of its own (not its task id: a message delivered
twice runs twice at once), so concurrent runs on the threads pool, and a run
called eagerly or directly from a request or another task, never share one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar

from sqlalchemy import Connection, Engine, event, orm
from sqlalchemy.exc import InvalidRequestError

from proj.jobs.context import scope_system

_task_scope: ContextVar[str | None] = ContextVar("proj_task_scope", default=None)
"""The key of the task run in progress in this context."""


def current_scope() -> Hashable:
    """The key a task-scoped session is scoped by: the running task, else the thread."""
    return _task_scope.get() or ("thread", threading.get_ident())


def in_task_run() -> bool:
    """True while a task run is in progress in this context."""
    return _task_scope.get() is not None


@contextmanager
def task_scope(key: str) -> Iterator[None]:
    """Make task-scoped sessions resolve to the session of the run named ``key``."""
    token = _task_scope.set(key)
    try:
        yield
    finally:
        _task_scope.reset(token)


def scoped_sessions(engine: Callable[[], Engine]) -> orm.scoped_session[orm.Session]:
    """A session registry scoped by :func:`current_scope`, its sessions bound
    to ``engine()`` (called when a session is made, so after a fork it is the
    child's engine)."""

    class RunSessionmaker(orm.sessionmaker[orm.Session]):
        def __call__(self, **local_kw: object) -> orm.Session:
            local_kw.setdefault("bind", engine())
            return super().__call__(**local_kw)

    return orm.scoped_session(RunSessionmaker(), scopefunc=current_scope)


@contextmanager
def session_scope(engine: Engine) -> Iterator[orm.Session]:
    """A session of its own on ``engine``: commits on success, rolls back on
    error, closes."""
    session = orm.Session(engine)
    try:
        yield session
        session.commit()
    except BaseException:
        roll_back(session)
        raise
    finally:
        session.close()


@contextmanager
def system_session(engine: Engine) -> Iterator[orm.Session]:
    """:func:`session_scope` in the system scope: each of its transactions
    sees every tenant's jobs (the ledger's own writes by id, operators'
    commands; see :func:`proj.jobs.context.system_scope`)."""
    with session_scope(engine) as session:
        event.listen(session, "after_begin", _scope_system)
        yield session


def _scope_system(session: orm.Session, transaction: object, connection: Connection) -> None:
    scope_system(connection)


def roll_back(session: orm.Session | orm.scoped_session[orm.Session]) -> None:
    """Roll ``session`` back after an error, unless its commit went through and
    what raised came after it (an ``after_commit`` hook, or a signal handler's
    ``SystemExit`` while the fast path publishes): SQLAlchemy refuses the
    rollback then, and the error that was raised must stay the one raised."""
    with suppress(InvalidRequestError):
        session.rollback()


def rolled_back_with(owner: orm.SessionTransaction | None, ended: orm.SessionTransaction) -> bool:
    """True if what was done in ``owner`` (None: outside any savepoint) was
    undone with ``ended``, the transaction or savepoint that was rolled back."""
    if ended.parent is None and not ended.nested:
        return True
    while owner is not None:
        if owner is ended:
            return True
        owner = owner.parent
    return False
