"""Transactional enqueue: a job runs if and only if its transaction commits.

``enqueue`` writes the job's ledger row in the caller's transaction. When that
transaction commits, the message is published at once from the same process
(the fast path); if it rolls back, nothing is published. Whatever the fast path
misses (the broker was down, the process died right after the commit) the
relay publishes (:mod:`proj.jobs.relay`), through :func:`publish_owed`: it claims
unpublished rows with ``FOR UPDATE SKIP LOCKED`` (by state, never by "id above
the last one seen", since rows commit out of order), publishes them in
confirmed batches, and marks them published in the same transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from amqp import spec
from celery import Celery
from kombu import Producer
from kombu.utils.json import dumps
from sqlalchemy import Connection, event, orm, select

from proj.jobs import ledger
from proj.jobs.clock import due_at, parse_eta, utcnow
from proj.jobs.errors import TaskArgumentError
from proj.jobs.ledger import mark_published
from proj.jobs.models import CLAIMABLE, Job, jsonable
from proj.jobs.registry import jobs_of
from proj.jobs.session import in_task_run

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs

logger = logging.getLogger(__name__)

JOB_HEADER = "proj_job"
"""Message header marking a job that has a ledger row."""
NOTIFY_CHANNEL = "proj_jobs"
CONFIRM_TIMEOUT = 30.0
"""Seconds the relay waits for RabbitMQ to confirm a batch."""
PENDING = "proj.outbox.pending"
"""``session.info`` key: jobs to publish when the session's transaction commits,
each with the savepoint it was enqueued in."""

MESSAGE_FIELDS = ("id", "name", "args", "kwargs", "options", "attempts")
"""The columns a job's message is made from."""
KEPT_OPTIONS = ("queue", "routing_key", "priority", "expires")
CANVAS_OPTIONS = frozenset({"link", "link_error", "chain", "chord", "group_id"})
"""Options that would make other tasks run after a job: refused, never dropped."""
"""Publishing options a job's row keeps, to send its message with again."""


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
    row = {
        "id": job_id,
        "name": task_name,
        "args": jsonable(list(args)),
        "kwargs": jsonable(dict(kwargs)),
        "options": jsonable(kept),
        "max_attempts": max_attempts,
        "available_at": max(eta or now, now),
    }
    standing = ledger.enqueue(session, row, unique_key=unique)
    if standing == job_id:
        _publish_on_commit(session, jobs, _message({**row, "attempts": 0}))
    return standing


def requeue(session: orm.Session, jobs: Jobs, job: Job) -> bool:
    """Queue a failed job again in ``session``'s transaction (published after
    the commit), with a fresh budget of attempts. False if it is not failed."""
    if not ledger.requeue(session, job.id):
        return False
    _publish_on_commit(session, jobs, _message({f: getattr(job, f) for f in MESSAGE_FIELDS}))
    return True


def _publish_on_commit(session: orm.Session, jobs: Jobs, message: Mapping[str, Any]) -> None:
    """Have the fast path publish a job's message when ``session``'s transaction commits.

    The job belongs to the innermost savepoint in progress, if any: rolling
    that savepoint back drops it, releasing it does not publish it.
    """
    if jobs.settings.outbox_fast_path or jobs.capture is not None:
        owner = session.get_nested_transaction()
        session.info.setdefault(PENDING, []).append((jobs, message, owner))


def _message(job: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`send` publishes, from a job's :data:`MESSAGE_FIELDS`."""
    return {
        "id": job["id"],
        "name": job["name"],
        "args": job["args"],
        "kwargs": job["kwargs"],
        "options": job["options"],
        "retries": max(job["attempts"], 0),
    }


def send(
    celery_app: Celery,
    message: Mapping[str, Any],
    producer: Producer | None = None,
    retry: bool = True,
) -> None:
    """Publish one job's message (with publisher confirms where the broker has them)."""
    options = dict(message["options"])
    if "eta" in options:
        options["eta"] = parse_eta(options["eta"])
    celery_app.send_task(
        message["name"],
        args=message["args"],
        kwargs=message["kwargs"],
        task_id=message["id"],
        headers={JOB_HEADER: True},
        # The ledger row is the job's state and result (GET /api/jobs/<id>);
        # Celery's result backend would write them again, and its STARTED
        # write, made before the task's body runs, would fail the delivery
        # while the database is away instead of letting the task retry.
        ignore_result=True,
        retries=message["retries"],
        producer=producer,
        retry=retry,
        **options,
    )


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
    for jobs, message, _ in pending:
        by_installation.setdefault(jobs, []).append(message)
    published: list[str] = []
    for jobs, messages in by_installation.items():
        published.extend(_publish_at_once(jobs, messages))
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


def _publish_at_once(jobs: Jobs, messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Publish what a transaction enqueued, trying once; the ids published (the
    relay publishes the rest)."""
    if jobs.capture is not None:
        jobs.capture(messages)
        return [message["id"] for message in messages]
    celery_app, sent = jobs.celery_app, 0
    try:
        with celery_app.producer_or_acquire() as producer:
            # One try: a request must not wait out kombu's reconnection
            # back-off while the broker is down; the relay covers the rest.
            producer.connection.ensure_connection(max_retries=0)
            for message in messages:
                send(celery_app, message, producer=producer, retry=False)
                sent += 1
    except Exception as exc:
        for message in messages[sent:]:
            logger.warning(
                "job %s[%s] committed but not published (%s); the relay will publish it",
                message["name"],
                message["id"],
                exc,
            )
    return [message["id"] for message in messages[:sent]]


def _forget_after_rollback(session: orm.Session, previous: orm.SessionTransaction) -> None:
    pending = session.info.get(PENDING)
    if pending:
        kept = [item for item in pending if not _within(item[2], previous)]
        session.info[PENDING] = kept


def _forget_unfinished(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    # The session's transaction ended without a commit (closed, or rolled
    # back): whatever it enqueued was never written.
    if transaction.parent is None and not transaction.nested:
        session.info.pop(PENDING, None)


def _within(owner: orm.SessionTransaction | None, ended: orm.SessionTransaction) -> bool:
    """True if a job enqueued in ``owner`` (None: outside any savepoint) goes
    with ``ended``, the transaction or savepoint that was rolled back."""
    if ended.parent is None and not ended.nested:
        return True
    while owner is not None:
        if owner is ended:
            return True
        owner = owner.parent
    return False


def publish_owed(
    connection: Connection, celery_app: Celery, *conditions: Any, limit: int | None = None
) -> int:
    """In ``connection``'s transaction: lock unpublished rows matching
    ``conditions`` (skipping rows another relay holds), publish their
    messages, mark them published. A message the broker refuses, or that
    cannot be sent at all, fails its job (with the reason) and holds up none
    of the others. Returns how many were published; commit is the caller's."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # one publisher at a time
    query = (
        select(*(getattr(Job, f) for f in MESSAGE_FIELDS), Job.available_at)
        .where(Job.published_at.is_(None), Job.state.in_(CLAIMABLE), *conditions)
        .order_by(Job.created_at)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = connection.execute(query).all()
    if not rows:
        return 0
    messages = [_row_message(row) for row in rows]
    capture = jobs_of(celery_app).capture
    if capture is not None:
        capture(messages)
        refused: dict[str, str] = {}
    else:
        refused = publish_batch(celery_app, messages)
    if refused:
        ledger.refused(connection, refused)
        for message in messages:
            if message["id"] in refused:
                logger.error(
                    "relay: job %s[%s] not published (%s); it is failed",
                    message["name"],
                    message["id"],
                    refused[message["id"]],
                )
    published = [row.id for row in rows if row.id not in refused]
    if published:
        mark_published(connection, published)
    return len(published)


def publish_batch(celery_app: Celery, messages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Publish ``messages``; once it returns, the broker has taken all but those
    it returns, by job id, with the reason it refused them or they could not be
    sent. A lost connection raises (none is taken for published).

    On RabbitMQ the channel is in publisher-confirm mode and the confirms of
    the whole batch are awaited together at the end (one at a time would cost
    a round trip a message). A channel the broker closes (a message over its
    size limit) sends the batch again one message at a time, to find which.
    """
    with celery_app.connection_for_write(transport_options={"confirm_publish": False}) as link:
        try:
            return _publish_on_one_channel(celery_app, link, messages)
        except link.channel_errors:
            refused: dict[str, str] = {}
            for message in messages:
                try:
                    refused.update(_publish_on_one_channel(celery_app, link, [message]))
                except link.channel_errors as exc:
                    refused[message["id"]] = f"the broker closed the channel: {exc}"
            return refused


def _publish_on_one_channel(
    celery_app: Celery, link: Any, messages: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    channel: Any = link.channel()
    try:
        confirms = _Confirms(channel) if link.transport.driver_type == "amqp" else None
        producer = Producer(channel)
        refused: dict[str, str] = {}
        for message in messages:
            try:
                # No retry: a connection lost mid-batch fails the batch (its
                # rows stay owed, for the next round) rather than publishing
                # the rest on a new channel whose confirms nobody awaits.
                send(celery_app, message, producer=producer, retry=False)
            except (*link.connection_errors, *link.channel_errors):
                raise
            except Exception as exc:  # this message cannot be sent at all
                refused[message["id"]] = f"{exc.__class__.__name__}: {exc}"
                continue
            if confirms is not None:
                confirms.sent(message["id"])
        if confirms is not None:
            refused.update(confirms.wait())
        return refused
    finally:
        channel.close()


class _Confirms:
    """RabbitMQ's confirms of what a channel publishes, counted as they come
    (they can arrive while the channel waits for something else)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.jobs: dict[int, str] = {}
        """Job id by delivery tag (the channel numbers its messages from 1)."""
        self.answered: set[int] = set()
        self.refused: set[int] = set()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)

    def sent(self, job_id: str) -> None:
        self.jobs[len(self.jobs) + 1] = job_id

    def _tags(self, tag: int, multiple: bool) -> set[int]:
        return set(range(1, tag + 1)) - self.answered if multiple else {tag}

    def _ack(self, tag: int, multiple: bool) -> None:
        self.answered |= self._tags(tag, multiple)

    def _nack(self, tag: int, multiple: bool) -> None:
        tags = self._tags(tag, multiple)
        self.refused |= tags
        self.answered |= tags

    def wait(self) -> dict[str, str]:
        """Once every message sent is answered: the ones RabbitMQ refused."""
        while len(self.answered) < len(self.jobs):
            self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=CONFIRM_TIMEOUT)
        reason = "RabbitMQ refused the message (basic.nack: a queue limit, or an internal error)"
        return {self.jobs[tag]: reason for tag in sorted(self.refused)}


def send_owed(jobs: Jobs, job_ids: Sequence[str]) -> None:
    """Publish these jobs now (a retry's next attempt); if the broker cannot
    take them, the relay will."""
    try:
        with jobs.engine.connect() as connection, connection.begin():
            publish_owed(connection, jobs.celery_app, Job.id.in_(job_ids))
    except Exception as exc:
        logger.warning("jobs %s not published now (%s); the relay will", list(job_ids), exc)


def _row_message(row: Any) -> dict[str, Any]:
    options = {k: v for k, v in (row.options or {}).items() if k != "eta"}
    if row.available_at > utcnow():
        options["eta"] = row.available_at.isoformat()
    return {**_message(row._mapping), "options": options}
