"""Test-only tasks the e2e worker subprocesses load (``--include e2e_tasks``).

Each one works through the task session, as an application task would.
Three variables arrange what the e2e tests need, and only in the worker:

- ``E2E_CONNECT_BEFORE_FORK``: the worker's main process opens a worker-tier
  connection as it imports this module, before it forks its children, as an
  application that queries at import time would;
- ``E2E_PAUSE_AFTER_CHARGE`` (seconds): the default payment gateway pauses
  after it has recorded a charge, so a test can kill the worker in the window
  between the gateway's record and the invoice's commit;
- ``E2E_WRITE_AT_START`` (seconds): a thread of the worker's main process
  holds a write transaction on the database that long from the moment this
  module is imported (when the pool is about to fork its children), printing
  ``e2e: write ended at <time>``, and each child prints ``e2e: child began at
  <time>`` as it starts.

``record_effect`` writes a row of ``e2e_effects`` (no unique key: a job that
took effect twice shows as two rows); :func:`enqueue_effects` enqueues such
jobs with ``delay_on_commit`` from a process of the test's own making
(``python -c``, see ``subprocesses.enqueue_effects``); ``canvas_step`` writes
there too, as a step of a chain or chord that can kill its own child. :func:`jobs`,
:func:`states` and :func:`effect_counts` are what the tests read back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from typing import Any

from celery import shared_task, signals
from celery.exceptions import Ignore, Reject
from sqlalchemy import (
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    event,
    orm,
    select,
    text,
)

from proj.db import Session, session_scope, worker_engine
from proj.jobs import TRANSIENT_ERRORS, SqlAlchemyTask, retry_on
from proj.jobs.models import Job
from proj.jobs.worker import claim_of
from proj.models import User
from proj.payments import LedgerGateway, Receipt

effects = Table(
    "e2e_effects",
    MetaData(),
    Column("tag", String(64), nullable=False),
    Column("n", Integer, nullable=False),
    Column("job_id", String(64)),
    Column("pid", Integer),
    Column("at", Float),
)
"""One row each time ``record_effect`` takes effect (its transaction commits)."""


def create_effects_table(engine: Engine) -> None:
    """Make ``e2e_effects`` in ``engine``'s database, if it is not there yet."""
    effects.create(engine, checkfirst=True)


class Flaky(Exception):
    """The error ``e2e.outcome`` retries (once)."""


@shared_task(name="e2e.create_user", ignore_result=False)
def create_user(email: str) -> int:
    """Insert a user; return its id."""
    user = User(email=email)
    Session.add(user)
    Session.flush()
    return user.id


@shared_task(name="e2e.read_email", ignore_result=False)
def read_email(user_id: int) -> str | None:
    """Read a user's email."""
    user = Session.get(User, user_id)
    return None if user is None else user.email


@shared_task(name="e2e.outcome", ignore_result=False)
@retry_on(Flaky, max_retries=1, backoff=0.01)
def outcome(kind: str, email: str) -> str:
    """Insert a user, then end as ``kind`` says: succeed, fail, retry (then
    fail), ignore or reject. Only ``succeed`` keeps the user."""
    Session.add(User(email=email))
    Session.flush()
    if kind == "fail":
        raise ValueError(f"e2e: {email} fails")
    if kind == "retry":
        raise Flaky(f"e2e: {email} is flaky")
    if kind == "ignore":
        raise Ignore()
    if kind == "reject":
        raise Reject(f"e2e: {email} rejected", requeue=False)
    return email


@shared_task(name="e2e.needs_user")
def needs_user(email: str) -> int:
    """The id of the user with ``email``; fails (for good: nothing retries a
    LookupError) while there is none, so a retry succeeds once the user exists."""
    user = Session.scalar(select(User).where(User.email == email))
    if user is None:
        raise LookupError(f"e2e: no user {email} yet")
    return user.id


@shared_task(name="e2e.record_effect", bind=True)
@retry_on(TRANSIENT_ERRORS, max_retries=10, backoff=0.5, max_backoff=2.0)
def record_effect(self: SqlAlchemyTask, tag: str, n: int, seconds: float = 0.0) -> int:
    """Use the database, take ``seconds``, then record the effect ``(tag, n)``
    (committed with the job's move to ``succeeded``)."""
    Session.execute(text("SELECT 1"))
    time.sleep(seconds)
    Session.execute(
        effects.insert().values(
            tag=tag, n=n, job_id=str(self.request.id), pid=os.getpid(), at=time.time()
        )
    )
    return n


@shared_task(name="e2e.slow_first_run", bind=True)
def slow_first_run(self: SqlAlchemyTask, tag: str, n: int, seconds: float) -> int:
    """Take ``seconds`` on the job's first attempt only, then record ``(tag, n)``."""
    claim = claim_of(self)
    if claim is not None and claim.attempts == 1:
        time.sleep(seconds)
    Session.execute(
        effects.insert().values(
            tag=tag, n=n, job_id=str(self.request.id), pid=os.getpid(), at=time.time()
        )
    )
    return n


@shared_task(name="e2e.canvas_step", bind=True)
def canvas_step(
    self: SqlAlchemyTask, given: list[Any], tag: str, n: int, die: str = ""
) -> list[Any]:
    """A canvas step: record the effect ``(tag, n)`` and return ``given`` (what
    the steps before it returned) with ``n`` after it. On the job's first
    attempt, ``die`` kills the child running it with SIGKILL: ``"running"``
    once the effect is written (it rolls back with the run), ``"committed"``
    the moment the run's transaction commits (before the fast path publishes
    the steps it released, and before the broker hears the job ran)."""
    Session.execute(
        effects.insert().values(
            tag=tag, n=n, job_id=str(self.request.id), pid=os.getpid(), at=time.time()
        )
    )
    claim = claim_of(self)
    if die and claim is not None and claim.attempts == 1:
        if die == "running":
            os.kill(os.getpid(), signal.SIGKILL)
        _die_after_commit(Session())
    return [*given, n]


def _die_after_commit(session: orm.Session) -> None:
    def die(committed: orm.Session) -> None:
        if committed is session:
            os.kill(os.getpid(), signal.SIGKILL)

    # First of every session's after_commit listeners: proj's fast path is one.
    event.listen(orm.Session, "after_commit", die, insert=True)


@shared_task(name="e2e.overtime", base=SqlAlchemyTask, time_limit=1, max_attempts=2)
def overtime() -> None:
    """Take far longer than its hard time limit (1 s), every time."""
    time.sleep(30)


@shared_task(name="e2e.kill_own_worker")
def kill_own_worker() -> None:
    """kill -9 the process running it, every time."""
    os.kill(os.getpid(), signal.SIGKILL)


def enqueue_effects(tag: str, count: int, seconds: float) -> list[str]:
    """Enqueue ``count`` ``record_effect`` jobs with ``delay_on_commit``, in one
    transaction; their job ids."""
    with session_scope() as session:
        return [
            record_effect.apply_async_on_commit((tag, n, seconds), session=session)
            for n in range(count)
        ]


def _pause_after_charge(pause: float) -> None:
    charge = LedgerGateway.charge

    def charge_then_pause(self: LedgerGateway, **kwargs: Any) -> Receipt:
        receipt = charge(self, **kwargs)
        time.sleep(pause)
        return receipt

    LedgerGateway.charge = charge_then_pause  # type: ignore[method-assign]


if os.environ.get("E2E_CONNECT_BEFORE_FORK"):
    # Checked in, not closed: the children inherit a pool holding it.
    with worker_engine().connect() as connection:
        connection.execute(text("SELECT 1"))

if os.environ.get("E2E_PAUSE_AFTER_CHARGE"):
    _pause_after_charge(float(os.environ["E2E_PAUSE_AFTER_CHARGE"]))


def _write_for(seconds: float) -> None:
    began = threading.Event()

    def write() -> None:
        with worker_engine().connect() as connection, connection.begin():
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            connection.execute(text("UPDATE jobs SET progress = progress WHERE 1 = 0"))
            began.set()
            time.sleep(seconds)
        print(f"e2e: write ended at {time.time()!r}", flush=True)

    threading.Thread(target=write, name="e2e-writer", daemon=True).start()
    began.wait()


def _child_began(**_: Any) -> None:
    print(f"e2e: child began at {time.time()!r}", flush=True)


if os.environ.get("E2E_WRITE_AT_START"):
    signals.worker_process_init.connect(_child_began, weak=False)
    _write_for(float(os.environ["E2E_WRITE_AT_START"]))


def jobs(job_ids: list[str]) -> list[Job]:
    """These jobs' ledger rows (detached), as the test process sees them."""
    with session_scope() as session:
        found = list(session.scalars(select(Job).where(Job.id.in_(job_ids))))
        session.expunge_all()
        return found


def states(job_ids: list[str]) -> Counter[str]:
    """How many of these jobs are in each state."""
    return Counter(job.state for job in jobs(job_ids))


def effect_counts(run: str) -> Counter[int]:
    """How many times each job ``n`` of ``run`` took effect."""
    with session_scope() as session:
        return Counter(session.scalars(select(effects.c.n).where(effects.c.tag == run)))
