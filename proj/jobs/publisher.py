"""Publishing a job's message: one function, :func:`send`, for the fast path,
the relay and a retry's next attempt alike.

:func:`publish_owed` is the relay's pass: it locks unpublished rows with ``FOR
UPDATE SKIP LOCKED`` (by state, never by "id above the last one seen", since
rows commit out of order), publishes them in confirmed batches, and marks
them published in the same transaction. A message the broker refuses, or
that cannot be sent at all, fails its own job and holds up no other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from amqp import spec
from celery import Celery
from celery.app.routes import MapRoute
from kombu import Producer
from kombu.common import maybe_declare
from sqlalchemy import Connection, and_, func, or_, select, true, union_all
from sqlalchemy.sql.elements import ColumnElement

from proj.jobs import context, ledger, tracing
from proj.jobs.clock import utcnow
from proj.jobs.ledger import MESSAGE_FIELDS, mark_published
from proj.jobs.models import CLAIMABLE, JOBS, MAX_PRIORITY, PAUSES, RATE_STARTS, Job, State
from proj.jobs.registry import jobs_of

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs

logger = logging.getLogger(__name__)

JOB_HEADER = "proj_job"
"""Message header marking a job that has a ledger row."""
CONCURRENCY_HEADER = "proj_concurrency_key"
"""Message header with a job's concurrency key (the lock its claim waits on)."""
RATE_HEADER = "proj_rate_key"
"""Message header with a job's rate key (see :mod:`proj.jobs.rates`)."""
CONFIRM_TIMEOUT = 30.0
"""Seconds the relay waits for RabbitMQ to confirm a batch."""
REPR_LIMIT = 1024
"""Characters of a message's arguments shown in the worker's log (Celery's own limit)."""


def job_message(job: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`send` publishes, from a job's :data:`MESSAGE_FIELDS`: to
    the queue its row names (where Celery's routes sent it when it was
    enqueued, whoever publishes it now: a job's queue is what a pause
    holds), and never with an ETA (a job is published when it is due; one an
    earlier version kept in a row's options is past)."""
    options = {k: v for k, v in (job["options"] or {}).items() if k != "eta"}
    if job.get("queue") and "queue" not in options:
        options["queue"] = job["queue"]
    return {
        "id": job["id"],
        "name": job["name"],
        "args": job["args"],
        "kwargs": job["kwargs"],
        "options": options,
        "retries": max(job["attempts"], 0),
        "context": job.get("context") or {},
        "concurrency_key": job.get("concurrency_key"),
        "rate_key": job.get("rate_key"),
    }


def send(
    celery_app: Celery, message: Mapping[str, Any], producer: Producer, declared: bool = False
) -> None:
    """Publish one job's message on ``producer``, trying once, inside the
    context it was enqueued in: a publish the relay makes long after joins the
    enqueuing request's trace. It waits for no publisher confirm: the relay
    awaits a whole batch's together (:class:`Confirms`).

    ``declared``: the caller has declared the message's queue on this
    connection already (:func:`declare_queues`); kombu would check and bind
    it again for each of the thousands of messages a second the relay sends."""
    options = publish_options(message, declared)
    task: Any = celery_app.tasks.get(message["name"])  # None: a task not known here
    defaults = task_options(task)
    with context.restored(message.get("context")), tracing.publishing(message):
        if "expires" in (options.keys() | defaults.keys()):
            # Celery's own way, for its expiry TTLs.
            send_with_celery(celery_app, message, producer, {**defaults, **options})
        else:
            send_direct(celery_app, message, producer, {**defaults, **options}, task)


def task_options(task: Any) -> dict[str, Any]:
    """The execution options ``task`` sets itself (its time limits…), which a
    job's own options override; none for a task not known here (None)."""
    if task is None:
        return {}
    return {k: v for k, v in task._get_exec_options().items() if v is not None}


def publish_options(message: Mapping[str, Any], declared: bool = False) -> dict[str, Any]:
    """The options a job's message is sent with: its own, and proj's headers."""
    carried = message.get("context") or {}
    options = {
        **message["options"],
        # The trace context at the top too, where the worker's Celery
        # instrumentation reads it: a publisher that is not traced (a relay
        # without tracing) still hands the run the job's trace. Where the
        # publisher is traced, the instrumentation puts its publish span's there.
        "headers": {
            JOB_HEADER: True,
            **({CONCURRENCY_HEADER: key} if (key := message.get("concurrency_key")) else {}),
            **({RATE_HEADER: rate} if (rate := message.get("rate_key")) else {}),
            context.HEADER: dict(carried),
            **{k: carried[k] for k in context.TRACE_FIELDS if k in carried},
        },
        "retry": False,
        # JSON data: its plain repr is safe, and costs less than saferepr.
        "argsrepr": repr(message["args"])[:REPR_LIMIT],
        "kwargsrepr": repr(message["kwargs"])[:REPR_LIMIT],
    }
    if declared:
        options["declare"] = []
    return options


def send_with_celery(
    celery_app: Celery, message: Mapping[str, Any], producer: Producer, options: dict[str, Any]
) -> None:
    """Publish through Celery's ``send_task``."""
    celery_app.send_task(
        message["name"],
        args=message["args"],
        kwargs=message["kwargs"],
        task_id=message["id"],
        # The ledger row is the job's state and result (GET /api/jobs/<id>);
        # Celery's result backend would write them again, and its STARTED
        # write, made before the task's body runs, would fail the delivery
        # while the database is away instead of letting the task retry.
        ignore_result=True,
        retries=message["retries"],
        producer=producer,
        **options,
    )


def send_direct(
    celery_app: Celery,
    message: Mapping[str, Any],
    producer: Producer,
    options: dict[str, Any],
    task: Any,
) -> None:
    """What :func:`send_with_celery` publishes, for a message with no
    ``expires`` (``options`` hold ``task``'s own, :func:`task_options`),
    without what a job never needs (an ``AsyncResult``, a result backend,
    canvas): the relay publishes about a third more a second.
    ``tests/integration/test_publisher.py`` compares the two, message by
    message, on every broker."""
    name, args, kwargs = message["name"], message["args"], message["kwargs"]
    amqp = celery_app.amqp
    time_limit = options.pop("time_limit", None)
    soft_time_limit = options.pop("soft_time_limit", None)
    options.pop("ignore_result", None)
    options = amqp.router.route(options, name, args, kwargs, task)
    root_id = parent_id = None
    parent: Any = celery_app.current_worker_task
    if parent:  # a retry's next attempt, published by the attempt before
        root_id = parent.request.root_id or parent.request.id
        parent_id = parent.request.id
        if celery_app.conf.task_inherit_parent_priority:
            options.setdefault("priority", parent.request.delivery_info.get("priority"))
    task_message = amqp.create_task_message(
        message["id"],
        name,
        args,
        kwargs,
        retries=message["retries"],
        reply_to=celery_app.thread_oid,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        create_sent_event=celery_app.conf.task_send_sent_event,
        root_id=root_id,
        parent_id=parent_id,
        ignore_result=True,
        **options,
    )
    connection: Any = producer.connection
    with connection._reraise_as_library_errors():  # as send_task raises
        amqp.send_task_message(producer, name, task_message, **options)


def route_of(
    celery_app: Celery,
    task_name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
) -> tuple[str | None, int]:
    """Where a job's message goes and at what priority, as :func:`send`
    routes it: its own options, else its task's, else Celery's routes (the
    queue is None if a router fails: the publish will say why); a priority
    none of them gives is ``task_default_priority``, none is 0, and it is
    kept from 0 to :data:`~proj.jobs.models.MAX_PRIORITY`."""
    task: Any = celery_app.tasks.get(task_name)
    given = {**task_options(task), **options}
    try:
        route = celery_app.amqp.router.route(given, task_name, tuple(args), dict(kwargs), task)
    except Exception:
        route = given
    queue = route.get("queue")
    priority = route.get("priority")
    if priority is None:
        priority = _default_priority(celery_app)
    try:
        kept = min(max(int(priority or 0), 0), MAX_PRIORITY)
    except (TypeError, ValueError):
        kept = 0
    return (str(getattr(queue, "name", queue)) if queue else None), kept


def _default_priority(celery_app: Celery) -> Any:
    found = _default_priorities.get(celery_app, _UNKNOWN)
    if found is _UNKNOWN:
        found = _default_priorities[celery_app] = celery_app.conf.task_default_priority
    return found


_UNKNOWN = object()
_default_priorities: WeakKeyDictionary[Celery, Any] = WeakKeyDictionary()
"""Each app's ``task_default_priority`` (read once: Celery's settings take
6 µs a read, as long as the rest of a job's routing)."""


def routed_by_name(celery_app: Celery) -> bool:
    """Whether every route of ``celery_app`` looks at a task's name alone (a
    ``task_routes`` mapping), so that jobs of one task with the same options
    all go to one queue."""
    router: Any = celery_app.amqp.router
    return all(isinstance(route, MapRoute) for route in router.routes)


def declare_queues(
    celery_app: Celery, link: Any, messages: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """Declare the queues ``messages`` go to on RabbitMQ, once each (as
    ``send_task`` routes them), on a channel of their own until the broker
    refuses one: the ids of the messages whose queue RabbitMQ refused to
    declare as configured (it has other arguments: PRECONDITION_FAILED),
    with the reason."""
    of_message = _queues(celery_app, messages)
    queues = {queue.name: queue for queue in of_message.values()}
    refused: dict[str, str] = {}
    channel: Any = link.channel()
    try:
        for name, found in queues.items():
            try:
                maybe_declare(found, channel, retry=False)
            except link.channel_errors as exc:
                refused[name] = f"queue {name} cannot be declared as configured: {exc}"
                channel = link.channel()  # the broker closed that one
    finally:
        channel.close()
    return {job: refused[q.name] for job, q in of_message.items() if q.name in refused}


def _queues(celery_app: Celery, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The queue (kombu's) each of ``messages`` goes to, by job id, as
    ``send_task`` routes it: by its ``queue`` option, else the app's routes."""
    found = {}
    for message in messages:
        queue = message["options"].get("queue")
        route = celery_app.amqp.router.route({"queue": queue} if queue else {}, message["name"])
        if route.get("queue") is not None:
            found[message["id"]] = route["queue"]
    return found


def publish_at_once(jobs: Jobs, messages: Sequence[Mapping[str, Any]]) -> list[str]:
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
                send(celery_app, message, producer)
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


def publish_owed(
    connection: Connection,
    celery_app: Celery,
    *conditions: Any,
    limit: int | None = None,
    by_priority: bool = True,
) -> int:
    """In ``connection``'s transaction: lock the due unpublished rows matching
    ``conditions`` (skipping rows another relay holds), publish their
    messages, mark them published. A message the broker refuses, or that
    cannot be sent at all, fails its job (with the reason) and holds up none
    of the others. A paused queue's jobs are left owed. Returns how many were
    published; commit is the caller's.

    ``by_priority``: up to ``limit`` rows are taken in the order the broker
    delivers priorities (:func:`priorities_first`), then by due time, one
    index range a priority (a sort of every owed row would cost seconds a
    batch behind a backlog of millions); without it (a few rows named by
    id), by due time alone."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # one publisher at a time
    capture = jobs_of(celery_app).capture
    # The in-memory mode records a job as soon as it is owed, due or not.
    due = () if capture is not None else (Job.available_at <= utcnow(),)
    where = (*owed(), *not_paused(connection), *due, *conditions)
    levels: list[Any] = [true()]
    if by_priority:
        levels = [
            and_(Job.priority == level, *unlimited()) for level in priorities_first(celery_app)
        ]
    rows: list[Any] = []
    for level in levels:
        left = None if limit is None else limit - len(rows)
        if left == 0:
            break
        rows.extend(_lock_owed(connection, and_(level, *where), left))
    left = None if limit is None else limit - len(rows)
    if by_priority and left != 0:
        rows.extend(_lock_owed(connection, Job.id.in_(free_slots(where, left)), None))
    return _publish_rows(connection, celery_app, rows)


def publish_free_slots(connection: Connection, celery_app: Celery, key: str) -> int:
    """:func:`publish_owed` for the jobs of the concurrency key ``key`` that
    fit in its free slots (a job of the key just ended); how many."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # one publisher at a time
    where = (*owed(), *not_paused(connection), Job.available_at <= utcnow())
    slots = free_slots((*where, Job.concurrency_key == key), None)
    return _publish_rows(connection, celery_app, _lock_owed(connection, Job.id.in_(slots), None))


def _publish_rows(connection: Connection, celery_app: Celery, rows: Sequence[Any]) -> int:
    """Publish the owed ``rows`` (locked), mark them published, fail those
    the broker refused; how many were published."""
    if not rows:
        return 0
    capture = jobs_of(celery_app).capture
    messages = [job_message(dict(row._mapping)) for row in rows]
    with tracing.sending(messages):
        if capture is not None:
            capture(messages)
            refused: dict[str, str] = {}
            held: dict[str, str] = {}
        else:
            refused, held = publish_batch(celery_app, messages)
    for job_id, reason in held.items():
        logger.error("relay: job %s not published (%s); it stays owed", job_id, reason)
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
    published = [row.id for row in rows if row.id not in refused and row.id not in held]
    if published:
        mark_published(connection, published)
    return len(published)


def _lock_owed(connection: Connection, where: Any, limit: int | None) -> list[Any]:
    """The message fields of the rows ``where`` picks, by due time, locked
    (skipping those another relay holds, on PostgreSQL)."""
    query = (
        select(*(getattr(Job, f) for f in MESSAGE_FIELDS))
        .where(where)
        .order_by(Job.available_at)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(connection.execute(query).all())


def free_slots(where: Sequence[Any], limit: int | None) -> Any:
    """SQL: the ids of the owed jobs with a concurrency or a rate key (of
    those ``where`` picks) that fit in what their keys allow now, by due time:
    a concurrency key's limit, less its jobs running and those published but
    not yet claimed (:mod:`proj.jobs.concurrency`); a rate key's limit, less
    its starts in the window and its jobs published but not yet claimed
    (:mod:`proj.jobs.rates`)."""
    ranked = (
        select(
            Job.id,
            Job.concurrency_key,
            Job.concurrency_limit,
            Job.rate_key,
            Job.rate_limit,
            func.row_number()
            .over(partition_by=Job.concurrency_key, order_by=Job.available_at)
            .label("rank"),
            func.row_number()
            .over(partition_by=Job.rate_key, order_by=Job.available_at)
            .label("rate_rank"),
        )
        .where(or_(Job.concurrency_key.is_not(None), Job.rate_key.is_not(None)), *where)
        .subquery()
    )
    busy = JOBS.alias("busy")
    sent = and_(busy.c.state.in_(CLAIMABLE), busy.c.published_at.is_not(None))
    taken = (
        select(func.count())
        .where(
            busy.c.concurrency_key == ranked.c.concurrency_key,
            or_(busy.c.state == str(State.RUNNING), sent),
        )
        .scalar_subquery()
    )
    started = (
        select(func.count())
        .where(RATE_STARTS.c.key == ranked.c.rate_key, RATE_STARTS.c.until > utcnow())
        .scalar_subquery()
    )
    rate_sent = select(func.count()).where(busy.c.rate_key == ranked.c.rate_key, sent)
    return (
        select(ranked.c.id)
        .where(
            or_(
                ranked.c.concurrency_key.is_(None),
                ranked.c.rank <= ranked.c.concurrency_limit - taken,
            ),
            or_(
                ranked.c.rate_key.is_(None),
                ranked.c.rate_rank <= ranked.c.rate_limit - started - rate_sent.scalar_subquery(),
            ),
        )
        .limit(limit)
    )


def publish_batch(
    celery_app: Celery, messages: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, str], dict[str, str]]:
    """Publish ``messages``; once it returns, the broker has taken all but
    those it returns, by job id, with the reason: those it refused or that
    could not be sent (to fail), and those held back, whose queue the
    broker would not declare as configured (a RabbitMQ queue declared
    before with other arguments: they stay owed until it is deleted or the
    configuration matches). A lost connection raises (none is taken for
    published).

    On RabbitMQ the channel is in publisher-confirm mode and the confirms of
    the whole batch are awaited together at the end (one at a time would cost
    a round trip a message). A channel the broker closes (a message over its
    size limit) sends the batch again one message at a time, to find which.
    Elsewhere a channel error is the broker's state, not a message's (Redis out
    of memory, or a read-only replica): it raises, and the batch stays owed.
    """
    with celery_app.connection_for_write(transport_options={"confirm_publish": False}) as link:
        amqp = link.transport.driver_type == "amqp"
        # Elsewhere each batch's channel declares its queues (below).
        held = declare_queues(celery_app, link, messages) if amqp else {}
        sending = [message for message in messages if message["id"] not in held]
        try:
            return _publish_on_one_channel(celery_app, link, sending), held
        except link.channel_errors:
            if link.transport.driver_type != "amqp":
                raise
            refused: dict[str, str] = {}
            for message in sending:
                try:
                    refused.update(_publish_on_one_channel(celery_app, link, [message]))
                except link.channel_errors as exc:
                    refused[message["id"]] = f"the broker closed the channel: {exc}"
            return refused, held


def _publish_on_one_channel(
    celery_app: Celery, link: Any, messages: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    channel: Any = link.channel()
    try:
        confirms = Confirms(channel) if link.transport.driver_type == "amqp" else None
        producer = Producer(channel)
        if confirms is None:  # not RabbitMQ: publish_batch declared nothing
            for queue in _queues(celery_app, messages).values():
                maybe_declare(queue, channel, retry=False)
        refused: dict[str, str] = {}
        # On Redis, the batch's messages go in pipelined writes instead of a
        # round trip each (kombu publishes at once where it cannot batch, and
        # before 5.7 it could not). A send that fails fails the rest of the
        # pipeline and raises again as the block ends: nothing is marked.
        batch: Any = getattr(producer, "batch", nullcontext)
        with batch():
            for message in messages:
                try:
                    # No retry: a connection lost mid-batch fails the batch (its
                    # rows stay owed, for the next round) rather than publishing
                    # the rest on a new channel whose confirms nobody awaits.
                    send(celery_app, message, producer, declared=True)
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


class Confirms:
    """RabbitMQ's confirms of what a channel publishes, counted as they come
    (they can arrive while the channel waits for something else): call
    :meth:`sent` after each publish, then :meth:`wait` once for them all."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.jobs: dict[int, str] = {}
        """Job id by delivery tag (the channel numbers its messages from 1)."""
        self.answered: set[int] = set()
        self.through = 0
        """Every tag up to this one is answered (a multiple ack or nack answers
        all those before its own)."""
        self.refused: set[int] = set()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)

    def sent(self, job_id: str) -> None:
        """``job_id``'s message is the next the channel published."""
        self.jobs[len(self.jobs) + 1] = job_id

    def _tags(self, tag: int, multiple: bool) -> set[int]:
        if not multiple:
            return {tag}
        tags = set(range(self.through + 1, tag + 1)) - self.answered
        self.through = max(self.through, tag)
        return tags

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


def send_next_of(jobs: Jobs, key: str) -> None:
    """A job of the concurrency key ``key`` ended: publish the jobs its free
    slots take now, rather than at the relay's next pass (failing that, the
    relay does)."""
    try:
        with jobs.engine.connect() as connection, connection.begin():
            context.scope_system(connection)
            publish_free_slots(connection, jobs.celery_app, key)
    except Exception as exc:
        logger.warning("jobs of key %s not published now (%s); the relay will", key, exc)


def send_owed(jobs: Jobs, job_ids: Sequence[str]) -> None:
    """Publish these jobs now (a retry's next attempt); if the broker cannot
    take them, the relay will."""
    try:
        with jobs.engine.connect() as connection, connection.begin():
            context.scope_system(connection)
            publish_owed(connection, jobs.celery_app, Job.id.in_(job_ids), by_priority=False)
    except Exception as exc:
        logger.warning("jobs %s not published now (%s); the relay will", list(job_ids), exc)


def owed() -> tuple[ColumnElement[bool], ...]:
    """Waiting rows whose message the broker has not taken (the predicate of
    the ``ix_jobs_owed`` index, written as it is so the planner uses it)."""
    return (Job.published_at.is_(None), Job.state.in_(CLAIMABLE))


def unlimited() -> tuple[ColumnElement[bool], ...]:
    """SQL: the job has neither a concurrency nor a rate key (the relay takes
    those only as far as their keys allow, :func:`free_slots`)."""
    return (Job.concurrency_key.is_(None), Job.rate_key.is_(None))


def not_paused(connection: Connection) -> tuple[ColumnElement[bool], ...]:
    """SQL: the job's queue is not paused (:mod:`proj.jobs.queues`; a job
    whose queue is not known never is). The paused queues are read first:
    none is no condition, and the planner keeps to the ``ix_jobs_owed`` index."""
    paused = list(connection.scalars(select(PAUSES.c.queue)))
    return (or_(Job.queue.is_(None), Job.queue.not_in(paused)),) if paused else ()


def priorities_first(celery_app: Celery) -> list[int]:
    """Job priorities in the order ``celery_app``'s broker delivers them: on
    Redis a lower number first (kombu's priority lists are read from 0 up),
    elsewhere a higher one (RabbitMQ's priority queues; a message with none is 0)."""
    redis = _on_redis.get(celery_app)
    if redis is None:
        with celery_app.connection_for_write() as link:
            redis = _on_redis[celery_app] = link.transport.driver_type == "redis"
    levels = list(range(MAX_PRIORITY + 1))
    return levels if redis else levels[::-1]


_on_redis: WeakKeyDictionary[Celery, bool] = WeakKeyDictionary()
"""Whether each app's broker is Redis (asked once: asking costs 0.1 ms)."""


def next_due(connection: Connection, *conditions: Any) -> datetime | None:
    """When the earliest owed job matching ``conditions``, in a queue that is
    not paused, falls due (None: none is owed): the earliest of each
    priority's, each the first entry of its range of ``ix_jobs_owed``."""
    # A job with a concurrency or rate key is left to the poll: due, it may
    # still wait for a slot, and a relay woken for it would look again and again.
    where = (*owed(), *not_paused(connection), *unlimited(), *conditions)
    each = union_all(
        *(
            select(func.min(Job.available_at).label("due")).where(Job.priority == level, *where)
            for level in range(MAX_PRIORITY + 1)
        )
    ).subquery()
    found: datetime | None = connection.scalar(select(func.min(each.c.due)))
    return found
