"""Transactional enqueue: a job runs if and only if its transaction commits.

``enqueue`` writes the job's ledger row in the caller's transaction. When that
transaction commits, the message is published at once from the same process
(the fast path: by the process's publishing thread, :mod:`proj.jobs.sender`,
so the committing request waits for its COMMIT, never for the broker; in a
task run, by the run's thread); if it rolls back, nothing is published.
Whatever the fast path misses (the broker was down, the process died right
after the commit) the relay publishes (:mod:`proj.jobs.relay`, through
:func:`proj.jobs.publisher.publish_owed`).

A job with a countdown or ETA, of any length, waits as its row: the relay
publishes it when it falls due, as a message with no ETA, so no broker holds
it meanwhile (a purge or a broker's loss cannot take it, and cancelling it
before then means no message is ever sent).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, orm

from proj.jobs import concurrency, context, ledger, metrics, publisher, rates, tracing
from proj.jobs.arguments import encoded_size
from proj.jobs.clock import due_at, utcnow
from proj.jobs.errors import TaskArgumentError
from proj.jobs.ledger import mark_published
from proj.jobs.models import Job, State, jsonable
from proj.jobs.publisher import job_message
from proj.jobs.retry import max_attempts_of
from proj.jobs.session import in_task_run, rolled_back_with

if TYPE_CHECKING:
    from proj.jobs import canvas
    from proj.jobs.extension import Jobs

logger = logging.getLogger(__name__)

PENDING = "proj.outbox.pending"
"""``session.info`` key: jobs to publish when the session's transaction commits,
each with the savepoint it was enqueued in."""

KEPT_OPTIONS = ("queue", "routing_key", "priority", "expires")
"""Publishing options a job's row keeps, to send its message with again."""
CANVAS_OPTIONS = frozenset({"link", "link_error", "chain", "chord", "group_id"})
"""Options that would make other tasks run after a job: a canvas's
(:func:`proj.jobs.enqueue_on_commit`), refused on a single job, never dropped."""


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
    _check_options(task_name, options)
    _check_size(jobs, task_name, args, kwargs)
    job_id = str(options.get("task_id") or uuid.uuid4())
    now = utcnow()
    due = max(due_at(options, now) or now, now)
    kept = {k: v for k, v in options.items() if k in KEPT_OPTIONS}
    with tracing.creating(jobs, task_name, [job_id], kept) as span:
        # Inside the create span: the row keeps its trace context, so the
        # job's publish and run spans descend from it.
        carried = context.capture()
        row = _row(task_name, job_id, args, kwargs, jsonable(kept), max_attempts, due, carried)
        row["queue"], row["priority"] = publisher.route_of(
            jobs.celery_app, task_name, args, kwargs, kept
        )
        task = jobs.celery_app.tasks.get(task_name)
        row.update(_limits(task, task_name, args, kwargs))
        standing = ledger.enqueue(session, row, unique_key=unique)
        if standing != job_id:
            span.set_attribute(tracing.STANDING_JOB, standing)
    if standing == job_id:
        # A job due later waits as its row: the relay publishes it when it
        # falls due, so no broker holds it meanwhile.
        message = job_message({**row, "attempts": 0})
        if due > now:  # what the in-memory mode records; never published so
            message["options"]["eta"] = due.isoformat()
        publish_on_commit(session, jobs, [message], new=True, now=due <= now)
    return standing


def _limits(
    task: Any, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """A new job's concurrency and rate limit columns (see
    :mod:`proj.jobs.concurrency` and :mod:`proj.jobs.rates`)."""
    return {
        **concurrency.row_values(task, task_name, args, kwargs),
        **rates.row_values(task, task_name, args, kwargs),
    }


def enqueue_many(
    session: orm.Session,
    jobs: Jobs,
    task_name: str,
    calls: Sequence[Sequence[Any]],
    *,
    max_attempts: int,
    options: Mapping[str, Any],
) -> list[str]:
    """Add a job's row for each of ``calls`` (positional arguments) to
    ``session``'s transaction, in one executemany; their ids, in order.

    Once the transaction commits, the jobs are counted and the relay
    publishes them, in batches the broker confirms, when they fall due; the
    fast path does not (publishing them one by one in the commit would hold
    the caller several seconds for 10,000). On PostgreSQL with the fast path
    off, the relay wakes on the rows' NOTIFY; with it on, the relay takes
    them after ``relay_grace`` seconds, as it takes any job the fast path
    missed. The in-memory mode records them at the commit, as it records any
    job. Raises :class:`TaskArgumentError` for ``task_id``, ``unique``,
    callbacks and chains, and for arguments larger than ``max_message_size``;
    nothing is written then.
    """
    refused = sorted({"task_id", "unique"} & set(options))
    if refused:
        raise TaskArgumentError(
            f"{task_name}: {', '.join(refused)} cannot go with enqueue_many (each job "
            "gets an id of its own, and none is skipped); enqueue such a job with "
            "apply_async_on_commit."
        )
    _check_options(task_name, options)
    for args in calls:
        _check_size(jobs, task_name, args, {})
    if not calls:
        return []
    job_ids = [str(uuid.uuid4()) for _ in calls]
    now = utcnow()
    due = max(due_at(options, now) or now, now)
    kept = {k: v for k, v in options.items() if k in KEPT_OPTIONS}
    with tracing.creating(jobs, task_name, job_ids, kept):
        carried = context.capture()
        stored = jsonable(kept)
        rows = [
            _row(task_name, job_id, args, {}, stored, max_attempts, due, carried)
            for job_id, args in zip(job_ids, calls, strict=True)
        ]
        app = jobs.celery_app
        task = app.tasks.get(task_name)
        for row, args in zip(rows, calls, strict=True):
            row.update(_limits(task, task_name, args, {}))
        if publisher.routed_by_name(app):  # one route for them all
            queue, priority = publisher.route_of(app, task_name, calls[0], {}, kept)
            for row in rows:
                row.update(queue=queue, priority=priority)
        else:
            for row, args in zip(rows, calls, strict=True):
                row["queue"], row["priority"] = publisher.route_of(app, task_name, args, {}, kept)
        ledger.enqueue_many(session, rows)
    messages = [job_message({**row, "attempts": 0}) for row in rows]
    if due > now:  # what the in-memory mode records
        for message in messages:
            message["options"]["eta"] = due.isoformat()
    publish_on_commit(session, jobs, messages, new=True, now=False)
    return job_ids


def enqueue_canvas(
    session: orm.Session,
    jobs: Jobs,
    steps: Sequence[canvas.Step],
    canvas_id: str,
    unique: str | None = None,
) -> str:
    """Add a row for each of a canvas's ``steps`` to ``session``'s
    transaction (see :mod:`proj.jobs.canvas`): the steps that wait for
    nothing ``queued`` (published after the commit, or by the relay when
    due), the others ``waiting``. Returns the id of its first step.

    With ``unique`` (a canvas that starts with one step), while a job of
    that step's task with that key waits or runs, nothing is added and that
    job's id is returned. Raises :class:`TaskArgumentError` for arguments
    larger than ``max_message_size`` (nothing is written then)."""
    for step in steps:
        _check_size(jobs, step.name, step.args, step.kwargs)
    now = utcnow()
    rows = []
    with tracing.creating(jobs, steps[0].name, [step.id for step in steps], {}):
        carried = context.capture()
        for step in steps:
            task: Any = jobs.celery_app.tasks.get(step.name)
            attempts = jobs.settings.max_attempts
            if task is not None:
                attempts = max_attempts_of(task, attempts)
            due = max(due_at(step.options, now) or now, now)
            kept = jsonable({k: v for k, v in step.options.items() if k in KEPT_OPTIONS})
            row = _row(step.name, step.id, step.args, step.kwargs, kept, attempts, due, carried)
            app = jobs.celery_app
            row["queue"], row["priority"] = publisher.route_of(
                app, step.name, step.args, step.kwargs, kept
            )
            row.update(_limits(task, step.name, step.args, step.kwargs))
            waits = bool(step.parents)
            row.update(
                canvas_id=canvas_id,
                graph=step.graph(),
                state=State.WAITING if waits else State.QUEUED,
                parents_left=len(step.parents),
            )
            rows.append(row)
        if unique is not None:
            first = rows.pop(0)
            standing = ledger.enqueue(session, first, unique_key=unique)
            if standing != first["id"]:
                return standing
            rows.insert(0, first)
            ledger.enqueue_canvas(session, rows[1:])
        else:
            ledger.enqueue_canvas(session, rows)
    for row in rows:
        message = job_message({**row, "attempts": 0})
        starts, due_now = row["state"] == State.QUEUED, row["available_at"] <= now
        publish_on_commit(session, jobs, [message], new=True, now=due_now, publish=starts)
    return str(rows[0]["id"])


def _check_options(task_name: str, options: Mapping[str, Any]) -> None:
    canvas = sorted(CANVAS_OPTIONS & set(options))
    if canvas:
        raise TaskArgumentError(
            f"{task_name}: {', '.join(canvas)} cannot go on a single ledger job (its "
            "message is sent again as it was enqueued, without them); enqueue the whole "
            "canvas with proj.jobs.enqueue_on_commit."
        )


def _check_size(jobs: Jobs, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse arguments that cannot cross the queue: not JSON, or larger than
    ``max_message_size``."""
    size = encoded_size(task_name, args, kwargs)
    if jobs.settings.max_message_size and size > jobs.settings.max_message_size:
        raise TaskArgumentError(
            f"{task_name}: the arguments take {size} bytes, more than PROJ_MAX_MESSAGE_SIZE "
            f"({jobs.settings.max_message_size}); pass ids and load the data in the task."
        )


def _row(
    task_name: str,
    job_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Any,
    max_attempts: int,
    due: datetime,
    carried: Mapping[str, str],
) -> dict[str, Any]:
    """A new job's ledger row (``options`` as the row keeps them)."""
    return {
        "id": job_id,
        "name": task_name,
        "args": jsonable(list(args)),
        "kwargs": jsonable(dict(kwargs)) if kwargs else {},
        "options": options,
        "max_attempts": max_attempts,
        "available_at": due,
        "context": carried,
        "tenant": carried.get("tenant"),
    }


def requeue(session: orm.Session, jobs: Jobs, job: Job) -> bool:
    """Queue a failed job again in ``session``'s transaction (published after
    the commit), with a fresh budget of attempts. False if it is not failed."""
    if not ledger.requeue(session, job.id):
        return False
    publish_on_commit(
        session, jobs, [job_message({f: getattr(job, f) for f in ledger.MESSAGE_FIELDS})]
    )
    return True


def publish_on_commit(
    session: orm.Session,
    jobs: Jobs,
    messages: Sequence[Mapping[str, Any]],
    *,
    new: bool = False,
    now: bool = True,
    publish: bool = True,
) -> None:
    """When ``session``'s transaction commits: count the jobs if they are
    ``new`` (:func:`proj.jobs.metrics.enqueued`), and have the fast path
    publish their ``messages`` if it is on and they are its ``now`` (the
    in-memory mode records every job they ``publish``; a canvas step that
    waits for others is only counted). ``messages`` are of one task.

    The jobs belong to the innermost savepoint in progress, if any: rolling
    that savepoint back drops them, releasing it does not publish them.
    """
    owner = session.get_nested_transaction()
    session.info.setdefault(PENDING, []).append((jobs, messages, owner, new, now, publish))


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
    for jobs, pending_messages, _, new, now, publish in pending:
        if new:
            metrics.enqueued(str(pending_messages[0]["name"]), len(pending_messages))
        if not publish:
            continue
        if jobs.capture is not None or (now and jobs.settings.outbox_fast_path):
            by_installation.setdefault(jobs, []).extend(pending_messages)
    if not by_installation:
        return
    engine: Any = session.get_bind(mapper=orm.class_mapper(Job))
    published: list[str] = []
    sent = utcnow()
    for jobs, messages in by_installation.items():
        if jobs.capture is None and not in_task_run():
            jobs.sender.hand(engine, messages)  # off the committing thread
        else:
            published.extend(publisher.publish_at_once(jobs, messages))
    if published:
        try:
            mark_published(engine, published, sent)
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
