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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import kombu.exceptions
from amqp import spec
from celery import Celery
from kombu import Producer
from sqlalchemy import Connection, event, orm, select

from proj.jobs import ledger
from proj.jobs.clock import due_at, parse_eta, utcnow
from proj.jobs.ledger import CLAIMABLE, Job, jsonable, mark_published
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
) -> str:
    """Add the job's row to ``session``'s transaction; publish after it commits.

    Returns the job id (the Celery task id).
    """
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
    ledger.enqueue(session, row)
    _publish_on_commit(session, jobs, _message({**row, "attempts": 0}))
    return job_id


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
    messages, mark them published. Returns how many; commit is the caller's."""
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
    if rows:
        messages = [_row_message(row) for row in rows]
        capture = jobs_of(celery_app).capture
        if capture is not None:
            capture(messages)
        else:
            with confirmed_batch(celery_app) as publish:
                for message in messages:
                    publish(message)
        mark_published(connection, [row.id for row in rows])
    return len(rows)


@contextmanager
def confirmed_batch(celery_app: Celery) -> Iterator[Callable[[Mapping[str, Any]], None]]:
    """A ``publish(message)`` whose messages the broker has all taken once the
    block ends.

    On RabbitMQ the channel is in publisher-confirm mode and the confirms of
    the whole batch are awaited together at the end (one at a time would cost
    a round trip a message); raises if RabbitMQ refuses any. Other brokers
    take each message before ``publish`` returns.
    """
    options = {"confirm_publish": False}  # confirmed here, per batch
    with celery_app.connection_for_write(transport_options=options) as connection:
        channel: Any = connection.channel()
        try:
            confirms = _Confirms(channel) if connection.transport.driver_type == "amqp" else None
            producer = Producer(channel)

            def publish(message: Mapping[str, Any]) -> None:
                # No retry: a connection lost mid-batch fails the batch (its
                # rows stay owed, for the next round) rather than publishing
                # the rest on a new channel whose confirms nobody awaits.
                send(celery_app, message, producer=producer, retry=False)
                if confirms is not None:
                    confirms.sent += 1

            yield publish
            if confirms is not None:
                confirms.wait()
        finally:
            channel.close()


class _Confirms:
    """RabbitMQ's confirms of what a channel publishes, counted as they come
    (they can arrive while the channel waits for something else)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.sent = 0
        self.confirmed: set[int] = set()
        self.refused = 0
        channel.confirm_select()
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)

    def _ack(self, tag: int, multiple: bool) -> None:
        self.confirmed.update(range(1, tag + 1) if multiple else (tag,))

    def _nack(self, tag: int, multiple: bool) -> None:
        self.refused += 1
        self._ack(tag, multiple)

    def wait(self) -> None:
        """Return once every message sent is confirmed; raise if any was refused."""
        while len(self.confirmed) < self.sent:
            self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=CONFIRM_TIMEOUT)
        if self.refused:
            raise kombu.exceptions.OperationalError(f"RabbitMQ refused {self.refused} messages")


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
