"""Transactional enqueue: a job runs if and only if its transaction commits.

``enqueue`` writes the job's ledger row in the caller's transaction. When that
transaction commits, the message is published at once from the same process
(the fast path); if it rolls back, nothing is published. Whatever the fast path
misses (the broker was down, the process died right after the commit) the
relay publishes (:mod:`proj.jobs.relay`, through
:func:`proj.jobs.publisher.publish_owed`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from kombu.utils.json import dumps
from sqlalchemy import event, orm

from proj.jobs import context, ledger, metrics, publisher, tracing
from proj.jobs.clock import due_at, utcnow
from proj.jobs.errors import TaskArgumentError
from proj.jobs.ledger import mark_published
from proj.jobs.models import Job, jsonable
from proj.jobs.publisher import job_message
from proj.jobs.session import in_task_run, rolled_back_with

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs

logger = logging.getLogger(__name__)

PENDING = "proj.outbox.pending"
"""``session.info`` key: jobs to publish when the session's transaction commits,
each with the savepoint it was enqueued in."""

KEPT_OPTIONS = ("queue", "routing_key", "priority", "expires")
"""Publishing options a job's row keeps, to send its message with again."""
CANVAS_OPTIONS = frozenset({"link", "link_error", "chain", "chord", "group_id"})
"""Options that would make other tasks run after a job: refused, never dropped."""


def callers_session(jobs: Jobs) -> orm.Session | None:
    """The session of the transaction in progress: the running task's, else the
    Flask request's ``db.session`` (after ``init_app``), else None."""
    if in_task_run():
        return jobs.session()
    return jobs.callers_session()


def owning(session: orm.Session | None, jobs: Jobs) -> ContextManager[orm.Session]:
    """``session`` as it is, or a session of its own on ``jobs``' engine."""
    return nullcontext(session) if session is not None else jobs.session_scope()


def enqueue(
    session: orm.Session,
    jobs: Jobs,
    task_name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    max_attempts: int,
    options: Mapping[str, Any],
    unique: str | None = None,
) -> str:
    """Add the job's row to ``session``'s transaction; publish after it commits.

    With ``unique``, while a job of this task with that key waits or runs,
    nothing is added and that job's id is returned. Returns the job id (the
    Celery task id). Raises :class:`TaskArgumentError` for options a ledger job
    cannot keep (callbacks, chains) and for arguments larger than
    ``max_message_size``.
    """
    canvas = sorted(CANVAS_OPTIONS & set(options))
    if canvas:
        raise TaskArgumentError(
            f"{task_name}: {', '.join(canvas)} cannot go with delay_on_commit (a ledger "
            "job's message is sent again as it was enqueued, without them); enqueue the "
            "next step from the task itself with delay_on_commit."
        )
    size = len(dumps([list(args), dict(kwargs)]))
    if jobs.settings.max_message_size and size > jobs.settings.max_message_size:
        raise TaskArgumentError(
            f"{task_name}: the arguments take {size} bytes, more than PROJ_MAX_MESSAGE_SIZE "
            f"({jobs.settings.max_message_size}); pass ids and load the data in the task."
        )
    job_id = str(options.get("task_id") or uuid.uuid4())
    now = utcnow()
    eta = due_at(options, now)
    kept = {k: v for k, v in options.items() if k in KEPT_OPTIONS}
    if eta is not None and eta > now:
        kept["eta"] = eta.isoformat()
    with tracing.creating(jobs, task_name, job_id, kept) as span:
        # Inside the create span: the row keeps its trace context, so the
        # job's publish and run spans descend from it.
        carried = context.capture()
        row = {
            "id": job_id,
            "name": task_name,
            "args": jsonable(list(args)),
            "kwargs": jsonable(dict(kwargs)),
            "options": jsonable(kept),
            "max_attempts": max_attempts,
            "available_at": max(eta or now, now),
            "context": carried,
            "tenant": carried.get("tenant"),
        }
        standing = ledger.enqueue(session, row, unique_key=unique)
        if standing != job_id:
            span.set_attribute(tracing.STANDING_JOB, standing)
    if standing == job_id:
        _publish_on_commit(session, jobs, job_message({**row, "attempts": 0}), new=True)
    return standing


def requeue(session: orm.Session, jobs: Jobs, job: Job) -> bool:
    """Queue a failed job again in ``session``'s transaction (published after
    the commit), with a fresh budget of attempts. False if it is not failed."""
    if not ledger.requeue(session, job.id):
        return False
    _publish_on_commit(
        session, jobs, job_message({f: getattr(job, f) for f in publisher.MESSAGE_FIELDS})
    )
    return True


def _publish_on_commit(
    session: orm.Session, jobs: Jobs, message: Mapping[str, Any], new: bool = False
) -> None:
    """When ``session``'s transaction commits: count the job if it is ``new``
    (:func:`proj.jobs.metrics.enqueued`), and have the fast path publish its
    message (if it is on).

    The job belongs to the innermost savepoint in progress, if any: rolling
    that savepoint back drops it, releasing it does not publish it.
    """
    owner = session.get_nested_transaction()
    session.info.setdefault(PENDING, []).append((jobs, message, owner, new))


_listening: list[bool] = []


def listen_for_commits() -> None:
    """Have every session publish its jobs when its transaction commits, and
    forget them when it rolls back (once a process; ``Jobs`` calls this)."""
    if _listening:
        return
    _listening.append(True)
    event.listen(orm.Session, "after_commit", _publish_after_commit)
    event.listen(orm.Session, "after_soft_rollback", _forget_after_rollback)
    event.listen(orm.Session, "after_transaction_end", _forget_unfinished)


def _publish_after_commit(session: orm.Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint was released: nothing is committed yet
    pending = session.info.pop(PENDING, None)
    if not pending:
        return
    by_installation: dict[Jobs, list[Mapping[str, Any]]] = {}
    for jobs, pending_message, _, new in pending:
        if new:
            metrics.enqueued(str(pending_message["name"]))
        if jobs.settings.outbox_fast_path or jobs.capture is not None:
            by_installation.setdefault(jobs, []).append(pending_message)
    published: list[str] = []
    for jobs, messages in by_installation.items():
        published.extend(publisher.publish_at_once(jobs, messages))
    if published:
        engine: Any = session.get_bind(mapper=orm.class_mapper(Job))
        try:
            mark_published(engine, published)
        except Exception:
            logger.warning(
                "could not mark %d published jobs; the relay may send them again",
                len(published),
                exc_info=True,
            )


def _forget_after_rollback(session: orm.Session, previous: orm.SessionTransaction) -> None:
    pending = session.info.get(PENDING)
    if pending:
        kept = [item for item in pending if not rolled_back_with(item[2], previous)]
        session.info[PENDING] = kept


def _forget_unfinished(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    # The session's transaction ended without a commit (closed, or rolled
    # back): whatever it enqueued was never written.
    if transaction.parent is None and not transaction.nested:
        session.info.pop(PENDING, None)
