"""The job ledger: one row per job, in the application's database.

A job's row is written in the transaction that enqueues it, so the job exists
if and only if that transaction commits. Its state only moves forward::

    queued ──> running ──> succeeded
      │  ^        │  └───> failed        (a final error, or attempts used up)
      │  └── retrying <┘                  (a retry, or the worker was lost)
      └──> cancelled

Claiming (``queued``/``retrying`` → ``running``, attempts + 1) is a statement
committed on its own; the move to ``succeeded`` commits with the
task's own effects. Every move a run makes (success, retry, failure,
progress, cancellation) is fenced by the attempt it claimed: it changes the
row only while the row is still ``running`` that attempt, so a run whose job
was taken back and claimed again cannot record anything, nor commit.

Rows are also the dead-letter store: every task that finally fails, and every
message a worker cannot run, ends as a ``failed`` row.

Each attempt that ends in an error (retried, failed, its worker lost) leaves
a ``job_attempts`` row with its error, traceback, worker and times.

This module is the only one that changes a job's ``state``, each change a
named function: :func:`enqueue`, :func:`enqueue_many`, :func:`enqueue_canvas`,
:func:`claim`, :func:`succeed`, :func:`release`, :func:`retrying`,
:func:`worker_lost`, :func:`record_failure`, :func:`refused`, :func:`cancel`,
:func:`revoke`, :func:`cancelled_while_running`, :func:`after_ended`,
:func:`requeue`, :func:`resend`, :func:`abandon` and :func:`prune`.

A canvas step (:mod:`proj.jobs.canvas`) waits as ``waiting`` until its
parents have succeeded: :func:`release` makes it ``queued`` in the
transaction of its last parent's success, and :func:`after_ended` cancels
it when a job before it fails or is cancelled.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Executable,
    Float,
    Integer,
    String,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from proj.jobs import context
from proj.jobs.clock import UtcDateTime, utcnow
from proj.jobs.context import SCOPE_SETTING, SYSTEM
from proj.jobs.engine import autocommit
from proj.jobs.errors import ClaimTakenBack
from proj.jobs.models import (
    ATTEMPTS,
    CLAIMABLE,
    FINISHED,
    JOBS,
    NOT_STARTED,
    RATE_STARTS,
    TENANT_OR_NONE,
    UNIQUE_WHILE,
    Job,
    JobAttempt,
    State,
    clip,
    jsonable,
)
from proj.jobs.retry import TRANSIENT_ERRORS, backoff
from proj.jobs.session import system_session

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

PATIENCE = 60.0
"""Seconds a ledger write keeps trying while the database is unreachable."""
UNIQUE_TRIES = 3
"""Times :func:`enqueue` tries again when the job holding a unique key ends
between its insert and its look-up."""
CLAIM_TRIES = 3
"""Times :func:`claim` tries a waiting job whose slot or queue changes under it."""
MESSAGE_FIELDS = (
    "id",
    "name",
    "args",
    "kwargs",
    "options",
    "attempts",
    "context",
    "queue",
    "concurrency_key",
    "rate_key",
)
"""The columns a job's message is made from (:func:`proj.jobs.publisher.job_message`)."""


@dataclass(frozen=True)
class Claim:
    """What claiming a job's row found."""

    claimed: bool
    state: str | None
    """The row's state (after the claim); None if proj never issued the id."""
    attempts: int = 0
    max_attempts: int = 0
    context: Mapping[str, Any] | None = None
    """The context the job was enqueued in, as its row keeps it: what its run
    restores, whatever its message's header says."""
    graph: Mapping[str, Any] | None = None
    """Its place in a canvas (the steps its success releases), if any."""
    held: str | None = None
    """Why a waiting job was not claimed (its queue is paused, or its
    concurrency or rate key is at its limit): its row is owed again, for the
    relay to publish when it may run."""


class Standalone:
    """A statement committed on its own, in one round trip (on an autocommit
    connection). On PostgreSQL its commit does not wait for the disk: WAL is
    flushed in order, so the next commit that does wait (the task's, the
    next request's) makes it durable too. Only for ledger writes whose loss in
    a server crash means a job is published or claimed again, which the claim
    makes harmless."""

    def __init__(
        self, sql: str, *binds: BindParameter[Any], returning: Mapping[str, Any] | None = None
    ) -> None:
        plain = text(sql).bindparams(*binds)
        # Sent as one query, the statements are one transaction, in the
        # system scope (the ledger's own writes see every tenant's rows).
        no_disk_wait = text(
            f"SET LOCAL synchronous_commit TO OFF; SET LOCAL {SCOPE_SETTING} TO '{SYSTEM}'; {sql}"
        ).bindparams(*binds)
        # The returned columns' types, where given (JSON is text on SQLite).
        self.plain: Executable = plain.columns(**returning) if returning else plain
        self.no_disk_wait: Executable = (
            no_disk_wait.columns(**returning) if returning else no_disk_wait
        )

    def run(self, engine: Engine, params: Mapping[str, Any]) -> list[Row[Any]]:
        """Execute and commit; the rows it returns, if any."""
        statement = self.no_disk_wait if engine.dialect.name == "postgresql" else self.plain
        with autocommit(engine) as connection:
            result = connection.execute(statement, params)
            return list(result) if result.returns_rows else []


_PAUSED = "SELECT 1 FROM job_queue_pauses WHERE job_queue_pauses.queue = jobs.queue"
"""SQL: the job's queue is paused (see :mod:`proj.jobs.queues`)."""
_FULL = (
    "jobs.concurrency_key IS NOT NULL AND (SELECT count(*) FROM jobs AS busy"  # noqa: S608
    " WHERE busy.concurrency_key = jobs.concurrency_key"
    f" AND busy.state = '{State.RUNNING}') >= jobs.concurrency_limit"
)
"""SQL: as many jobs of the job's concurrency key run as its limit allows
(see :mod:`proj.jobs.concurrency`)."""
_RATED = (
    "jobs.rate_key IS NOT NULL AND (SELECT count(*) FROM job_rate_starts AS started"
    " WHERE started.key = jobs.rate_key AND started.until > :now) >= jobs.rate_limit"
)
"""SQL: as many jobs of the job's rate key started in the last period as its
rate allows (see :mod:`proj.jobs.rates`)."""
# The f-strings hold State's constants only, never input.
_CLAIM_SQL = (
    f"UPDATE jobs SET state = '{State.RUNNING}', attempts = attempts + 1, started_at = :now,"  # noqa: S608
    " worker = :worker, error = NULL"
    f" WHERE id = :id AND state IN ('{State.QUEUED}', '{State.RETRYING}')"
    f" AND NOT EXISTS ({_PAUSED}) AND NOT ({_FULL}) AND NOT ({_RATED})"
    " RETURNING attempts, max_attempts, context, graph, rate_key, rate_period"
)
_CLAIMED = {
    "attempts": Integer,
    "max_attempts": Integer,
    "context": JSON,
    "graph": JSON,
    "rate_key": String,
    "rate_period": Float,
}
_CLAIM = Standalone(_CLAIM_SQL, bindparam("now", type_=UtcDateTime), returning=_CLAIMED)
_CLAIM_KEYED = Standalone(
    # The claims of one key take turns (PostgreSQL): the count in the UPDATE,
    # a statement of its own, sees every claim committed before its turn.
    f"SELECT pg_advisory_xact_lock(hashtext(:key)); {_CLAIM_SQL}",
    bindparam("now", type_=UtcDateTime),
    returning=_CLAIMED,
)
_STATE = Standalone("SELECT state FROM jobs WHERE id = :id")
_LOCK_KEY = text("SELECT pg_advisory_xact_lock(hashtext(:key))")
_HAND_BACK = Standalone(
    # Due from now: a publisher that sent it before marks it published no
    # more (mark_published), so it is owed, whatever the order of the two.
    "UPDATE jobs SET published_at = NULL, available_at = :now"  # noqa: S608
    f" WHERE id = :id AND state IN ('{State.QUEUED}', '{State.RETRYING}')"
    f" AND (EXISTS ({_PAUSED}) OR ({_FULL}) OR ({_RATED}))"
    f" RETURNING queue, EXISTS ({_PAUSED}) AS paused, concurrency_key, concurrency_limit,"
    f" ({_FULL}) AS is_full, rate_key, rate_limit, rate_period",
    bindparam("now", type_=UtcDateTime),
)
_OWE_AGAIN = Standalone(
    "UPDATE jobs SET published_at = NULL, available_at = :now"  # noqa: S608
    f" WHERE id = :id AND state IN ('{State.QUEUED}', '{State.RETRYING}')",
    bindparam("now", type_=UtcDateTime),
)
_MARK_PUBLISHED = Standalone(
    "UPDATE jobs SET published_at = :now WHERE id IN :ids AND published_at IS NULL",
    bindparam("now", type_=UtcDateTime),
    bindparam("ids", expanding=True),
)
_MARK_SENT = Standalone(
    # A row handed back since (its due time moved to then) is owed again.
    "UPDATE jobs SET published_at = :now WHERE id IN :ids AND published_at IS NULL"
    " AND available_at <= :sent",
    bindparam("now", type_=UtcDateTime),
    bindparam("sent", type_=UtcDateTime),
    bindparam("ids", expanding=True),
)


def claim(
    engine: Engine,
    job_id: str,
    worker: str,
    key: str | None = None,
    rate_key: str | None = None,
) -> Claim:
    """Move the job to ``running`` if it is ``queued`` or ``retrying``, committed
    at once (see :class:`Standalone`), outside the task's transaction.

    A job that is running elsewhere, finished or cancelled is left alone. A
    waiting job whose queue is paused, whose concurrency key has as many jobs
    running as its limit, or whose rate key has had as many starts in its
    period as its rate allows, is handed back: owed to the broker again, its
    attempts as they were (see :attr:`Claim.held`). ``key`` and
    ``rate_key``: the job's concurrency and rate keys, as its message says
    (its claim then waits its turn among the key's, on PostgreSQL).
    """
    keyed = key is not None and engine.dialect.name == "postgresql"
    statement = _CLAIM_KEYED if keyed else _CLAIM
    params = {"id": job_id, "worker": worker, "key": key}
    for _ in range(CLAIM_TRIES):  # again if its queue was resumed, or a slot freed, meanwhile
        now = utcnow()
        if rate_key is not None:
            rows = _claim_rated(engine, {**params, "now": now}, rate_key)
        else:
            rows = statement.run(engine, {**params, "now": now})
            if rows and rows[0].rate_key is not None:  # a message without its header
                _start(engine, rows[0].rate_key, rows[0].rate_period, now)
        if rows:
            found = rows[0]
            return Claim(
                True, State.RUNNING, found.attempts, found.max_attempts, found.context, found.graph
            )
        held = _HAND_BACK.run(engine, {"id": job_id, "now": utcnow()})
        found_state = _STATE.run(engine, {"id": job_id})
        state = found_state[0].state if found_state else None
        if held:
            return Claim(False, state, held=_why_held(held[0]))
        if state not in CLAIMABLE:
            return Claim(False, state)
    # Still waiting: each try, a slot was taken before its claim and freed
    # before its hand back. Owed again all the same: the relay sends it anew.
    _OWE_AGAIN.run(engine, {"id": job_id, "now": utcnow()})
    return Claim(False, state, held="its claim lost the race for a slot each time")


def _claim_rated(engine: Engine, params: Mapping[str, Any], rate_key: str) -> list[Row[Any]]:
    """Claim a job with a rate key and record its start, in one transaction
    (on PostgreSQL under its keys' advisory locks, taken in one order)."""
    with engine.begin() as connection:
        context.scope_system(connection)
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            for key in sorted({rate_key, params["key"]} - {None}):
                connection.execute(_LOCK_KEY, {"key": key})
        rows = list(connection.execute(_CLAIM.plain, params))
        _forget_starts(connection, rate_key, params["now"])
        if rows:
            _record_start(connection, rows[0].rate_key, rows[0].rate_period, params["now"])
    return rows


def _start(engine: Engine, key: str, period: float, now: datetime) -> None:
    with engine.begin() as connection:
        _record_start(connection, key, period, now)


def _record_start(connection: Connection, key: str, period: float, now: datetime) -> None:
    connection.execute(insert(RATE_STARTS).values(key=key, until=now + timedelta(seconds=period)))


def _forget_starts(connection: Connection, key: str, now: datetime) -> None:
    """Delete the starts of ``key`` that have left its window."""
    connection.execute(
        delete(RATE_STARTS).where(RATE_STARTS.c.key == key, RATE_STARTS.c.until <= now)
    )


def _why_held(back: Row[Any]) -> str:
    """Why a claim handed a job back, from :data:`_HAND_BACK`'s row."""
    if back.paused:
        return f"queue {back.queue} is paused"
    if back.is_full:
        return f"{back.concurrency_limit} jobs of key {back.concurrency_key} run already"
    return (
        f"{back.rate_limit} jobs of rate key {back.rate_key} started in the last "
        f"{back.rate_period:g} s"
    )


def mark_published(
    bind: Engine | Connection, job_ids: Sequence[str], sent: datetime | None = None
) -> None:
    """Record that the broker took these jobs' messages: in the connection's
    transaction (whose lock on the rows keeps a worker from handing them back
    meanwhile), or given an engine, on its own (see :class:`Standalone`),
    for those not handed back by a worker since they were ``sent``."""
    params = {"ids": list(job_ids), "now": utcnow()}
    if isinstance(bind, Connection):
        bind.execute(_MARK_PUBLISHED.plain, params)
    else:
        _MARK_SENT.run(bind, {**params, "sent": sent or params["now"]})


_TAKE_OWED = Standalone(
    "UPDATE jobs SET published_at = :now WHERE id IN :ids AND published_at IS NULL"  # noqa: S608
    f" AND state IN ('{State.QUEUED}', '{State.RETRYING}') RETURNING id",
    bindparam("now", type_=UtcDateTime),
    bindparam("ids", expanding=True),
)
_OWED_AGAIN = text("UPDATE jobs SET published_at = NULL WHERE id IN :ids").bindparams(
    bindparam("ids", expanding=True)
)


def take_owed(connection: Connection, job_ids: Sequence[str]) -> list[str]:
    """In ``connection``'s transaction (in the system scope): mark those of
    ``job_ids`` still owed to the broker published, which locks their rows
    until it ends, so no relay publishes them meanwhile; which ones. The
    caller publishes them before it commits, and hands back with
    :func:`owed_again` those it could not. The commit does not wait for the
    disk, as :class:`Standalone`'s does not."""
    postgres = connection.dialect.name == "postgresql"
    statement = _TAKE_OWED.no_disk_wait if postgres else _TAKE_OWED.plain
    return list(connection.scalars(statement, {"ids": list(job_ids), "now": utcnow()}))


def owed_again(connection: Connection, job_ids: Sequence[str]) -> None:
    """In the transaction of :func:`take_owed`: these jobs were not published
    after all; the relay will publish them."""
    connection.execute(_OWED_AGAIN, {"ids": list(job_ids)})


_SUCCEED = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("job_id"),
        JOBS.c.state == str(State.RUNNING),
        JOBS.c.attempts == bindparam("attempt"),
    )
    .values(
        state=str(State.SUCCEEDED),
        finished_at=bindparam("now"),
        result=bindparam("result"),
        progress=None,
    )
)
"""Built once: building an UPDATE costs more Python than running it."""


def succeed(session: Session, job_id: str, attempt: int, result: Any) -> None:
    """Mark the job succeeded, in the caller's (the task's) transaction, if
    it is still ``running`` the attempt ``attempt``; else raise
    :class:`~proj.jobs.errors.ClaimTakenBack` (the caller rolls back)."""
    done = session.connection().execute(
        _SUCCEED,
        {"job_id": job_id, "attempt": attempt, "now": utcnow(), "result": jsonable(result)},
    )
    if done.rowcount != 1:
        raise ClaimTakenBack(
            f"job {job_id} is no longer running attempt {attempt}: it was taken back and "
            "given to another run, so this run's transaction rolls back"
        )


def running_attempt(job_id: str, attempt: int) -> tuple[ColumnElement[bool], ...]:
    """The job's row while it is ``running`` the attempt ``attempt``: the fence
    of every change a run makes."""
    return (Job.id == job_id, Job.state == State.RUNNING, Job.attempts == attempt)


def enqueue(session: Session, row: Mapping[str, Any], unique_key: str | None = None) -> str:
    """Write a new ``queued`` job's row at once on ``session``'s connection, in
    its transaction (the ORM's unit of work would cost more than the INSERT).

    With ``unique_key``, while a job of the same task and tenant with that key
    waits or runs, nothing is written and that job's id is returned; this
    never raises into the caller's transaction. Returns the id of the job
    that stands.
    """
    connection = session.connection(bind_arguments={"mapper": Job})
    values = {**row, "state": str(State.QUEUED), "attempts": 0, "unique_key": unique_key}
    if unique_key is None:
        connection.execute(_INSERT_JOB, values)
        return str(row["id"])
    for _ in range(UNIQUE_TRIES):
        if connection.execute(_insert_unless_held(connection), values).rowcount:
            return str(row["id"])
        tenant = row.get("tenant")
        holder = connection.scalar(
            select(Job.id).where(
                Job.name == row["name"],
                Job.tenant.is_(None) if tenant is None else Job.tenant == tenant,
                Job.unique_key == unique_key,
                Job.state.in_(_HOLDING),
            )
        )
        if holder is not None:
            return str(holder)
    raise RuntimeError(f"the unique key {unique_key!r} of {row['name']} kept changing hands")


_INSERT_JOB = insert(JOBS)
_HOLDING = (State.QUEUED, State.RETRYING, State.RUNNING)


def _insert_unless_held(connection: Connection) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(JOBS).on_conflict_do_nothing(
        index_elements=["name", TENANT_OR_NONE, "unique_key"], index_where=text(UNIQUE_WHILE)
    )


def set_progress(engine: Engine, job_id: str, attempt: int, progress: float) -> bool:
    """Record the progress (0 to 100) of the attempt ``attempt``, in a
    transaction of its own, visible at once. Returns whether someone asked the
    job to stop."""
    with system_session(engine) as session:
        asked = session.execute(
            update(Job)
            .where(*running_attempt(job_id, attempt))
            .values(progress=progress)
            .returning(Job.cancel_requested_at)
        ).scalar()
    return asked is not None


def cancel_requested(engine: Engine, job_id: str) -> bool:
    """Whether someone asked the running job to stop."""
    return bool(_CANCEL_ASKED.run(engine, {"id": job_id}))


_CANCEL_ASKED = Standalone("SELECT 1 FROM jobs WHERE id = :id AND cancel_requested_at IS NOT NULL")


def patient(write: F) -> F:
    """Make a ledger write try again while the database is unreachable (for up
    to :data:`PATIENCE` seconds): a brief outage must not leave a job
    ``running`` for good. The writes it wraps are safe to repeat."""

    @functools.wraps(write)
    def patiently(*args: Any, **kwargs: Any) -> Any:
        tries, deadline = 0, time.monotonic() + PATIENCE
        while True:
            try:
                return write(*args, **kwargs)
            except Exception as exc:
                delay = backoff(tries, base=0.2, cap=5.0, jitter=False)
                if exc not in TRANSIENT_ERRORS or time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "ledger: %s failed (%s); again in %.1f s", write.__name__, exc, delay
                )
                time.sleep(delay)
                tries += 1

    return patiently  # type: ignore[return-value]


ATTEMPT_FIELDS = ("job_id", "attempt", "outcome", "error", "traceback", "worker", "started_at")


def _keep_attempt(
    session: Session,
    outcome: Any,
    error: str,
    traceback: str | None,
    *where: ColumnElement[bool],
) -> None:
    """Add the ``job_attempts`` row of the attempt in progress of each job
    matching ``where``, before its row moves on (same transaction)."""
    now = utcnow()
    session.execute(
        insert(ATTEMPTS).from_select(
            [
                "job_id",
                "attempt",
                "outcome",
                "error",
                "traceback",
                "worker",
                "started_at",
                "finished_at",
            ],
            select(
                Job.id,
                Job.attempts,
                outcome,
                literal(clip(error)),
                literal(clip(traceback)),
                Job.worker,
                Job.started_at,
                literal(now, UtcDateTime),
            ).where(*where),
        )
    )


@patient
def retrying(
    engine: Engine,
    job_id: str,
    attempt: int,
    error: str,
    traceback: str | None,
    available_at: datetime,
) -> bool:
    """Mark the job, running the attempt ``attempt``, to run again from
    ``available_at``; the caller publishes. False, and nothing changed, when
    the job is no longer running that attempt."""
    running = running_attempt(job_id, attempt)
    with system_session(engine) as session:
        _keep_attempt(session, literal(str(State.RETRYING)), error, traceback, *running)
        done = session.execute(
            update(Job)
            .where(*running)
            .values(
                state=State.RETRYING,
                error=clip(error),
                traceback=clip(traceback),
                available_at=available_at,
                published_at=None,
                worker=None,
            )
        )
    return bool(getattr(done, "rowcount", 0))


def _again_or_failed() -> Any:
    """``retrying``, or ``failed`` for a job whose attempts are used up."""
    return case((Job.attempts >= Job.max_attempts, str(State.FAILED)), else_=str(State.RETRYING))


@patient
def worker_lost(
    engine: Engine,
    job_id: str,
    error: str,
    worker: str | None = None,
    *,
    requeued: bool = True,
) -> State | None:
    """The worker running the job died: back to ``retrying``, or ``failed`` if
    that was its last attempt. Given ``worker`` (``hostname:pid``, as
    :func:`claim` records it), only if that process was the one running it: a
    duplicate delivery lost elsewhere leaves the run in progress alone. With
    ``requeued`` false (the message was acknowledged: a hard time limit), the
    job is owed to the broker again. Returns the new state, or None if
    nothing changed."""
    final = Job.attempts >= Job.max_attempts
    owner = () if worker is None else (Job.worker == worker,)
    running = (Job.id == job_id, Job.state == State.RUNNING, *owner)
    owed = {} if requeued else {"published_at": None}
    with system_session(engine) as session:
        _keep_attempt(session, _again_or_failed(), error, None, *running)
        state = session.scalar(
            update(Job)
            .where(*running)
            .values(
                state=_again_or_failed(),
                finished_at=case((final, utcnow()), else_=None),
                error=clip(error),
                worker=None,
                **owed,
            )
            .returning(Job.state)
        )
        if state == State.FAILED:
            after_ended(session.connection(), [job_id], failed=True)
    return State(state) if state else None


@patient
def record_failure(
    engine: Engine,
    *,
    job_id: str,
    name: str,
    error: str,
    traceback: str | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    attempts: int = 1,
    claimed: bool = False,
    tenant: str | None = None,
) -> None:
    """End a job as ``failed``, creating its row if it has none (a task sent
    with plain ``delay()``, or a message that could not be run). A run that
    ``claimed`` the job's row (its attempt ``attempts``) fails it only while
    it is still running that attempt. A row made here is ``tenant``'s."""
    values = {
        "state": State.FAILED,
        "error": clip(error),
        "traceback": clip(traceback),
        "finished_at": utcnow(),
        "worker": None,
    }
    unfinished = (
        running_attempt(job_id, attempts)
        if claimed
        else (Job.id == job_id, Job.state.not_in(FINISHED))
    )
    with system_session(engine) as session:
        _keep_attempt(session, literal(str(State.FAILED)), error, traceback, *unfinished)
        done = session.execute(update(Job).where(*unfinished).values(**values))
        if getattr(done, "rowcount", 0):
            after_ended(session.connection(), [job_id], failed=True)
        elif session.get(Job, job_id) is None:
            session.add(
                Job(
                    id=job_id,
                    name=name,
                    args=jsonable(list(args)),
                    kwargs=jsonable(dict(kwargs or {})),
                    options=jsonable(dict(options or {})),
                    attempts=attempts,
                    max_attempts=attempts,
                    published_at=utcnow(),
                    tenant=tenant,
                    **values,
                )
            )
            session.add(
                JobAttempt(
                    job_id=job_id,
                    attempt=attempts,
                    outcome=State.FAILED,
                    error=clip(error),
                    traceback=clip(traceback),
                )
            )


@patient
def plain_task_lost(
    engine: Engine, task_id: str, error: str, worker: str | None, max_attempts: int
) -> int:
    """A task sent with plain ``delay()`` (it has no row) lost its worker: the
    number of this attempt, which proj counts as the broker does not. Before
    the last (``max_attempts``), the attempt is kept (its message goes back to
    the queue); on the last the caller ends the job with :func:`record_failure`."""
    with system_session(engine) as session:
        before = session.scalar(
            select(func.count(JobAttempt.id)).where(JobAttempt.job_id == task_id)
        )
        attempt = int(before or 0) + 1
        if attempt < max_attempts:
            session.add(
                JobAttempt(
                    job_id=task_id,
                    attempt=attempt,
                    outcome=State.RETRYING,
                    error=clip(error),
                    worker=worker,
                )
            )
    return attempt


def refused(connection: Connection, reasons: Mapping[str, str]) -> None:
    """The broker refused these waiting jobs' messages (or they could not be
    encoded): they end ``failed`` with the reason, in ``connection``'s
    transaction, and never hold up the jobs behind them."""
    failed = []
    for job_id, reason in reasons.items():
        done = connection.execute(
            update(JOBS)
            .where(JOBS.c.id == job_id, JOBS.c.state.in_(CLAIMABLE))
            .values(
                state=str(State.FAILED),
                error=clip(f"not published: {reason}"),
                finished_at=utcnow(),
            )
        )
        if done.rowcount:
            failed.append(job_id)
    after_ended(connection, failed, failed=True)


def requeue(session: Session, job_id: str) -> bool:
    """Queue a failed job again in ``session``'s transaction, with a fresh budget
    of attempts (the caller publishes it after the commit). False if it is not failed."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == State.FAILED)
        .values(
            state=State.QUEUED,
            max_attempts=Job.attempts + Job.max_attempts,
            available_at=utcnow(),
            published_at=None,
            finished_at=None,
            worker=None,
            cancel_requested_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 0) != 1:
        return False
    _wait_again(session.connection(), job_id)
    return True


def cancel(session: Session, job_id: str) -> State | None:
    """Cancel a job, in ``session``'s transaction: a waiting one is ``cancelled``
    at once (it will never run), with every canvas step after it; a running
    one is asked to stop (it sees the request at its next check). Returns the
    state it was in, or None if it has finished (nothing changed)."""
    state = session.scalar(select(Job.state).where(Job.id == job_id).with_for_update())
    now = utcnow()
    if state in NOT_STARTED:
        values: dict[str, Any] = {"state": State.CANCELLED, "finished_at": now}
    elif state == State.RUNNING:
        values = {"cancel_requested_at": now}
    else:
        return None
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if state in NOT_STARTED:
        after_ended(session.connection(), [job_id], failed=False)
    return State(state)


def revoke(session: Session, job_ids: Sequence[str], *, terminate: bool) -> None:
    """Celery's revoke of these jobs, in ``session``'s transaction: waiting
    ones end ``cancelled``; running ones are asked to stop, or with
    ``terminate`` (their process is being killed) end ``cancelled`` at once."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state.in_(NOT_STARTED))
        .values(state=State.CANCELLED, finished_at=now, error="revoked")
        .execution_options(synchronize_session=False)
    )
    cancelled = {"state": State.CANCELLED, "finished_at": now, "worker": None, "progress": None}
    stopped = {**cancelled, "error": "terminated"} if terminate else {"cancel_requested_at": now}
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state == State.RUNNING)
        .values(**stopped)
        .execution_options(synchronize_session=False)
    )
    after_ended(session.connection(), _in_state(session, job_ids, State.CANCELLED), failed=False)


@patient
def cancelled_while_running(engine: Engine, job_id: str, attempt: int) -> None:
    """The job's attempt ``attempt`` stopped because it was asked to: ``cancelled``
    (nothing, if the job is no longer running that attempt)."""
    with system_session(engine) as session:
        session.execute(
            update(Job)
            .where(*running_attempt(job_id, attempt))
            .values(state=State.CANCELLED, finished_at=utcnow(), worker=None, progress=None)
        )
        after_ended(
            session.connection(), _in_state(session, [job_id], State.CANCELLED), failed=False
        )


def resend(session: Session, job_ids: Sequence[str], published_before: datetime) -> None:
    """Owe the broker these waiting jobs again (the broker lost them): the
    relay publishes them next."""
    session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids),
            Job.state.in_(CLAIMABLE),
            Job.published_at < published_before,
        )
        .values(published_at=None)
    )


def abandon(session: Session, job_ids: Sequence[str]) -> None:
    """These running jobs' workers are gone: back to ``retrying``, owed to the
    broker, or ``failed`` for those whose attempts are used up."""
    running = (Job.id.in_(job_ids), Job.state == State.RUNNING)
    error = "the worker running it stopped answering"
    _keep_attempt(session, _again_or_failed(), error, None, *running)
    session.execute(
        update(Job)
        .where(*running)
        .values(
            state=_again_or_failed(),
            finished_at=case((Job.attempts >= Job.max_attempts, utcnow()), else_=None),
            published_at=None,
            worker=None,
            error=error,
        )
    )
    after_ended(session.connection(), _in_state(session, job_ids, State.FAILED), failed=True)


def _in_state(session: Session, job_ids: Sequence[str], state: State) -> list[str]:
    """Those of ``job_ids`` now in ``state``."""
    return list(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.state == state)))


AFTER_ENDED = "a job before it did not succeed"
"""The start of the error of a canvas step cancelled because of a job before it."""


def enqueue_canvas(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write a canvas's rows on ``session``'s connection, in its transaction,
    in one executemany: each row says its state (``queued``, or ``waiting``
    with its ``parents_left``) and its ``graph``."""
    connection = session.connection(bind_arguments={"mapper": Job})
    connection.execute(_INSERT_JOB, [{**row, "attempts": 0} for row in rows])


def release(
    session: Session, job_id: str, result: Any, graph: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """In the transaction of ``job_id``'s success (its return value ``result``):
    each step after it counts one parent less, and those left with none are
    ``queued``, their parents' results before their arguments; its error
    callbacks are ``cancelled`` (they will never be needed). Returns the
    released rows (:data:`MESSAGE_FIELDS`), for the
    caller to publish after the commit.

    A step is released once: its parents' successes each take one from its
    count in their own transaction, one after the other (the row's lock)."""
    connection = session.connection(bind_arguments={"mapper": Job})
    now = utcnow()
    errbacks = list(graph.get("errbacks") or ())
    if errbacks:
        connection.execute(
            update(JOBS)
            .where(JOBS.c.id.in_(errbacks), JOBS.c.state == str(State.WAITING))
            .values(state=str(State.CANCELLED), finished_at=now, error=f"job {job_id} succeeded")
        )
    children = sorted(graph.get("children") or ())
    if not children:
        return []
    if connection.dialect.name == "postgresql" and len(children) > 1:
        # In one order for every parent: two parents of the same steps
        # (after a group) never wait for each other's locks in a cycle.
        connection.execute(
            select(JOBS.c.id).where(JOBS.c.id.in_(children)).order_by(JOBS.c.id).with_for_update()
        )
    counted = connection.execute(
        update(JOBS)
        .where(JOBS.c.id.in_(children), JOBS.c.state == str(State.WAITING))
        .values(parents_left=JOBS.c.parents_left - 1)
        .returning(JOBS.c.id, JOBS.c.parents_left, JOBS.c.graph, JOBS.c.args)
    ).all()
    released = []
    for row in counted:
        if row.parents_left > 0:
            continue
        step, args = row.graph or {}, list(row.args or ())
        if not step.get("immutable"):
            given = _results(connection, step["parents"]) if step.get("gather") else result
            args = [jsonable(given), *args]
        released.append(_queue(connection, row.id, args, now))
    return released


def _results(connection: Connection, job_ids: Sequence[str]) -> list[Any]:
    """The results of these jobs, in their order."""
    found = dict(
        connection.execute(select(JOBS.c.id, JOBS.c.result).where(JOBS.c.id.in_(job_ids))).all()
    )
    return [found.get(job_id) for job_id in job_ids]


def _queue(connection: Connection, job_id: str, args: list[Any], now: datetime) -> dict[str, Any]:
    """A waiting step ``queued`` with ``args``, due now; its message fields."""
    row = connection.execute(
        update(JOBS)
        .where(JOBS.c.id == job_id)
        .values(
            state=str(State.QUEUED), args=args, available_at=now, published_at=None, parents_left=0
        )
        .returning(*(JOBS.c[name] for name in MESSAGE_FIELDS))
    ).one()
    return dict(row._mapping)


def after_ended(connection: Connection, job_ids: Sequence[str], *, failed: bool) -> None:
    """These canvas steps ended ``failed`` (``failed``) or ``cancelled``, in
    ``connection``'s transaction: a failed one's error callbacks are
    ``queued`` (the relay publishes them), with its id before their
    arguments; every step after them, and the callbacks of those, end
    ``cancelled``, naming the job that did not succeed."""
    ended = connection.execute(
        select(JOBS.c.id, JOBS.c.graph).where(JOBS.c.id.in_(job_ids), JOBS.c.canvas_id.is_not(None))
    ).all()
    now = utcnow()
    for job_id, graph in ended:
        errbacks = list((graph or {}).get("errbacks") or ())
        if failed and errbacks:
            waiting = connection.execute(
                select(JOBS.c.id, JOBS.c.args, JOBS.c.graph).where(
                    JOBS.c.id.in_(errbacks), JOBS.c.state == str(State.WAITING)
                )
            ).all()
            for errback, args, step in waiting:
                given = list(args or ())
                _queue(
                    connection,
                    errback,
                    given if (step or {}).get("immutable") else [job_id, *given],
                    now,
                )
            errbacks = []
        reason = f"{AFTER_ENDED}: {job_id}"
        frontier = [*(graph or {}).get("children", ()), *errbacks]
        while frontier:
            stopped = connection.execute(
                update(JOBS)
                .where(JOBS.c.id.in_(frontier), JOBS.c.state == str(State.WAITING))
                .values(state=str(State.CANCELLED), finished_at=now, error=reason)
                .returning(JOBS.c.graph)
            ).all()
            frontier = [
                after
                for (step,) in stopped
                for after in (*(step or {}).get("children", ()), *(step or {}).get("errbacks", ()))
            ]


def _wait_again(connection: Connection, job_id: str) -> None:
    """``job_id`` is queued again: the steps after it that its end cancelled
    (and their error callbacks) wait again, each for its parents that have
    not succeeded."""
    graph = connection.scalar(select(JOBS.c.graph).where(JOBS.c.id == job_id)) or {}
    frontier = list(graph.get("children") or ())
    while frontier:
        stopped = connection.execute(
            select(JOBS.c.id, JOBS.c.graph).where(
                JOBS.c.id.in_(frontier),
                JOBS.c.state == str(State.CANCELLED),
                JOBS.c.error.startswith(AFTER_ENDED),
            )
        ).all()
        frontier = []
        for step_id, step in stopped:
            parents = list((step or {}).get("parents") or ())
            left = connection.scalar(
                select(func.count()).where(
                    JOBS.c.id.in_(parents), JOBS.c.state != str(State.SUCCEEDED)
                )
            )
            connection.execute(
                update(JOBS)
                .where(JOBS.c.id == step_id)
                .values(state=str(State.WAITING), parents_left=left, finished_at=None, error=None)
            )
            frontier.extend((*(step or {}).get("children", ()), *(step or {}).get("errbacks", ())))


def attempts_of(session: Session, job_id: str) -> list[JobAttempt]:
    """The job's attempts that ended in an error, oldest first."""
    query = select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.id)
    return list(session.scalars(query))


def prune(session: Session, finished_before: datetime) -> int:
    """Delete the jobs that finished before ``finished_before``, and their
    attempts, in ``session``'s transaction; how many jobs."""
    old = select(Job.id).where(*_finished_before(finished_before))
    session.execute(delete(JobAttempt).where(JobAttempt.job_id.in_(old)))
    prune_rate_starts(session.connection())
    result = session.execute(delete(Job).where(Job.id.in_(old)))
    return int(getattr(result, "rowcount", 0) or 0)


def prune_batch(connection: Connection, finished_before: datetime, size: int) -> int:
    """Delete up to ``size`` of the jobs that finished before
    ``finished_before``, and their attempts, in
    ``connection``'s transaction; how many jobs. Their rows are locked first
    (skipping any another pruner or an operator's requeue holds), so a job
    requeued meanwhile is never deleted."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    query = select(Job.id).where(*_finished_before(finished_before)).limit(size)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = list(connection.scalars(query))
    if not ids:
        return 0
    connection.execute(delete(JobAttempt).where(JobAttempt.job_id.in_(ids)))
    connection.execute(delete(Job).where(Job.id.in_(ids)))
    return len(ids)


def prune_rate_starts(connection: Connection) -> None:
    """Forget the rate-limit starts that have left their window."""
    connection.execute(delete(RATE_STARTS).where(RATE_STARTS.c.until < utcnow()))


def _finished_before(cutoff: datetime) -> tuple[ColumnElement[bool], ...]:
    # A job finished before the cutoff was created before it too: that bound
    # lets ix_jobs_state_created_at serve the search.
    return (Job.state.in_(FINISHED), Job.created_at < cutoff, Job.finished_at < cutoff)


def enqueue_many(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write new ``queued`` jobs' rows on ``session``'s connection, in its
    transaction. On PostgreSQL (psycopg2) they go in one ``INSERT ...
    VALUES`` that psycopg2's ``execute_values`` builds, their JSON encoded
    once (SQLAlchemy's executemany spends as long again on its per-row
    work); elsewhere in one executemany."""
    if not rows:
        return
    connection = session.connection(bind_arguments={"mapper": Job})
    new = {"state": str(State.QUEUED), "attempts": 0, "created_at": utcnow()}
    if connection.dialect.driver != "psycopg2":
        connection.execute(_INSERT_JOB, [{**row, **new} for row in rows])
        return
    from psycopg2.extras import execute_values

    columns = [*rows[0], *new]
    texts: dict[int, str] = {}
    """JSON text by value: the batch's options and context are one object each."""

    def encode(name: str, value: Any) -> Any:
        if name not in JSON_COLUMNS:
            return value
        found = texts.get(id(value))
        if found is None:
            found = texts[id(value)] = json.dumps(value)
        return found

    encoded = []
    for row in rows:
        full = {**row, **new}
        encoded.append(tuple(encode(name, full[name]) for name in columns))
    raw: Any = connection.connection
    with raw.cursor() as cursor:
        # The column names are the ledger's own, never input.
        statement = f"INSERT INTO jobs ({', '.join(columns)}) VALUES %s"  # noqa: S608
        execute_values(cursor, statement, encoded, page_size=len(encoded))


JSON_COLUMNS = frozenset(column.name for column in JOBS.columns if isinstance(column.type, JSON))
"""The ``jobs`` columns that hold JSON (encoded by :func:`enqueue_many` itself)."""
