"""The relay on real databases and brokers: it publishes what a process that
died after its commit never did, publishes again what a relay that died before
marking had sent (and the worker runs it once), never skips nor repeats a row
when several relays run over transactions committing out of order, and keeps
listening on PostgreSQL when its LISTEN connection is killed."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from celery.worker import WorkController
from sqlalchemy import func, select, text, update

import proj.jobs.testing
from proj.celery import make_celery
from proj.db import Session, session_scope
from proj.jobs import Jobs, outbox, shared_task
from proj.jobs.models import Job, State
from proj.jobs.relay import NOTIFY_CHANNEL, Relay, make_relay
from proj.models import Invoice, User

if TYPE_CHECKING:
    from conftest import Stack

RELAYS = 4


@shared_task(name="tests.relay.record", ignore_result=True)
def record(user_id: int) -> int:
    """The effect: one invoice for ``user_id``."""
    Session.add(Invoice(user_id=user_id, amount_cents=1))
    return user_id


@contextmanager
def queue_worker(stack: Stack, celery_app: Celery, queue: str) -> Iterator[WorkController]:
    """A worker consuming ``queue`` only, on a Celery app of its own: a
    worker's choice of queues stays with its app, and would starve the
    default queue of every later worker on ``celery_app``."""
    own = make_celery(stack.settings)
    try:
        with proj.jobs.testing.worker(own, queues=[queue]) as running:
            yield running
    finally:
        own.close()
        celery_app.set_current()  # the worker made its app current and default
        celery_app.set_default()


@pytest.fixture
def fast_path_off(celery_app: Celery) -> Iterator[None]:
    """Jobs committed from now on are left to the relay."""
    jobs = Jobs.of(celery_app)
    settings = jobs.settings
    jobs.settings = replace(settings, outbox_fast_path=False)
    yield
    jobs.settings = settings


@pytest.fixture
def task_log() -> Iterator[BufferingHandler]:
    """What ``proj.jobs.worker`` logs, from INFO up (the worker sets the root level to WARNING)."""
    handler = BufferingHandler(capacity=10_000)
    logger = logging.getLogger("proj.jobs.worker")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@contextmanager
def relay(stack: Stack, celery_app: Celery, **settings: Any) -> Iterator[Relay]:
    """An outbox relay on an engine of its own (no grace unless asked)."""
    made = make_relay(celery_app, replace(stack.settings.jobs, **{"relay_grace": 0.0, **settings}))
    try:
        yield made
    finally:
        made.engine.dispose()


def new_user() -> int:
    with session_scope() as session:
        user = User(email=f"relay-{uuid.uuid4().hex}@example.com")
        session.add(user)
        session.flush()
        return user.id


def effects(user_id: int) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count(Invoice.id)).filter_by(user_id=user_id)) or 0)


job = proj.jobs.testing.job


def new_queue() -> str:
    return f"tests.relay.{uuid.uuid4().hex}"


def bound(celery_app: Celery, channel: Any, queue: str) -> Any:
    """``queue`` on ``channel``, as ``celery_app`` declares it (a priority queue on RabbitMQ)."""
    return celery_app.amqp.queues[queue](channel)


def queue_size(celery_app: Celery, queue: str) -> int:
    """Messages ready in ``queue`` (declared if missing, as Celery declares it)."""
    with celery_app.connection_for_write() as connection:
        declared = bound(celery_app, connection.default_channel, queue)
        declared.declare()
        return int(declared.queue_declare().message_count)


def drain(celery_app: Celery, queue: str) -> Counter[str]:
    """Take every message out of ``queue``: how many there were of each task id."""
    ids: Counter[str] = Counter()
    with celery_app.connection_for_write() as connection:
        declared = bound(celery_app, connection.default_channel, queue)
        declared.declare()
        while (message := declared.get(no_ack=True)) is not None:
            ids[message.headers["id"]] += 1
    return ids


def run_script(stack: Stack, tmp_path: Path, source: str, *args: str) -> str:
    """Run ``source`` in a new Python process on the stack; expect it to die
    with status 17 (``os._exit``) and return what it printed."""
    script = tmp_path / f"script-{uuid.uuid4().hex[:8]}.py"
    script.write_text(textwrap.dedent(source))
    done = subprocess.run(
        [sys.executable, str(script), *args],
        env=stack.process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 17, done.stderr
    return done.stdout


COMMIT_THEN_DIE = """
    import os
    import sys

    from sqlalchemy import event, orm

    import proj.celery
    from proj.db import session_scope
    from proj.models import User
    from proj.jobs import shared_task


    @shared_task(name="tests.relay.record")
    def record(user_id):
        raise AssertionError("runs in the test's worker only")


    def die(session):
        os._exit(17)


    # Before proj's own listener: the process dies once the commit is done
    # and before the fast path publishes anything.
    event.listen(orm.Session, "after_commit", die, insert=True)
    with session_scope() as session:
        user = User(email=sys.argv[1])
        session.add(user)
        session.flush()
        job_id = record.apply_async_on_commit((user.id,), session=session, queue=sys.argv[2])
        print(user.id, job_id, flush=True)
"""


def test_relay_publishes_what_a_dead_process_committed(
    stack: Stack, celery_app: Celery, tmp_path: Path
) -> None:
    """A process that dies right after committing a job, before publishing
    it, leaves the row to the relay: it publishes it, and the job runs once.
    (The worker's own relay ends with the worker.)"""
    queue = new_queue()
    printed = run_script(
        stack, tmp_path, COMMIT_THEN_DIE, f"relay-{uuid.uuid4().hex}@example.com", queue
    )
    user_id, job_id = int(printed.split()[0]), printed.split()[1]

    assert (job(job_id).state, job(job_id).published_at) == (State.QUEUED, None)
    assert queue_size(celery_app, queue) == 0
    with relay(stack, celery_app) as box:
        assert box.relay_once() >= 1
    assert job(job_id).published_at is not None
    assert queue_size(celery_app, queue) == 1
    with queue_worker(stack, celery_app, queue):
        proj.jobs.testing.wait_for(lambda: job(job_id).state == State.SUCCEEDED)
    assert (effects(user_id), job(job_id).attempts) == (1, 1)
    relays = [thread for thread in threading.enumerate() if thread.name == "proj-relay"]
    assert relays == [], "the stopped worker left its relay running"


RELAY_THEN_DIE = """
    import os
    from dataclasses import replace

    from proj.jobs import publisher
    from proj.celery import app
    from proj.config import load_settings
    from proj.jobs.relay import make_relay


    def die(bind, job_ids):
        os._exit(17)


    # The broker has confirmed the messages; the process dies before the
    # rows are marked published.
    publisher.mark_published = die
    make_relay(app, replace(load_settings().jobs, relay_grace=0.0)).relay_once()
"""


def test_relay_dying_before_marking_publishes_again_runs_once(
    stack: Stack,
    celery_app: Celery,
    tmp_path: Path,
    fast_path_off: None,
    task_log: BufferingHandler,
) -> None:
    """A relay that dies after the broker confirmed a job but before marking
    its row leaves it owed: the next relay publishes it again with the same
    id, and the worker runs it once and skips the second delivery."""
    queue = new_queue()
    user_id = new_user()
    job_id = record.apply_async_on_commit((user_id,), queue=queue)
    assert queue_size(celery_app, queue) == 0

    run_script(stack, tmp_path, RELAY_THEN_DIE)

    assert queue_size(celery_app, queue) == 1
    assert job(job_id).published_at is None
    with relay(stack, celery_app) as box:
        assert box.relay_once() >= 1
    assert job(job_id).published_at is not None
    assert queue_size(celery_app, queue) == 2
    with queue_worker(stack, celery_app, queue):
        proj.jobs.testing.wait_for(lambda: queue_size(celery_app, queue) == 0)
        proj.jobs.testing.wait_for(lambda: job(job_id).state == State.SUCCEEDED)
        skipped = f"tests.relay.record[{job_id}]: job is succeeded; skipping this delivery"
        running = f"tests.relay.record[{job_id}]: job is running; skipping this delivery"
        proj.jobs.testing.wait_for(
            lambda: {r.getMessage() for r in task_log.buffer} & {skipped, running}
        )
    assert (effects(user_id), job(job_id).attempts) == (1, 1)


def test_four_relays_publish_every_row_once(
    stack: Stack, celery_app: Celery, fast_path_off: None
) -> None:
    """Four relays running while many transactions commit out of order (some
    after the relays went past newer rows) publish every row exactly once.

    10,000 rows on PostgreSQL; 2,000 on SQLite, where relays and writers take
    turns on one file and the embedded broker is a table."""
    total = 10_000 if stack.on_postgres else 2_000
    per_transaction, writers = 50, 8
    name = f"tests.relay.bulk.{uuid.uuid4().hex}"
    queue = new_queue()
    stop = threading.Event()
    settings = replace(stack.settings.jobs, relay_grace=0.0, relay_poll_interval=0.1)
    boxes = [make_relay(celery_app, settings) for _ in range(RELAYS)]
    relays = [threading.Thread(target=box.relay, args=(stop,)) for box in boxes]
    job_ids: list[str] = []
    lock = threading.Lock()

    def published() -> int:
        with session_scope() as session:
            query = select(func.count(Job.id)).where(
                Job.name == name, Job.published_at.is_not(None)
            )
            return int(session.scalar(query) or 0)

    def write(count: int, early: bool = False) -> None:
        begun = proj.jobs.utcnow()
        if early and not stack.on_postgres:
            # One writer at a time on SQLite: this transaction cannot stay
            # open while the relays publish, so it begins after they have.
            proj.jobs.testing.wait_for(lambda: published() >= total // 4, timeout=120)
        with session_scope() as session:
            made = [
                outbox.enqueue(
                    session,
                    Jobs.of(celery_app),
                    name,
                    [n],
                    {},
                    max_attempts=1,
                    options={"queue": queue},
                )
                for n in range(count)
            ]
            if early:
                # Older than every other row, committed after the relays
                # have published newer ones.
                session.execute(update(Job).where(Job.id.in_(made)).values(created_at=begun))
                if stack.on_postgres:
                    proj.jobs.testing.wait_for(lambda: published() >= total // 4, timeout=120)
            else:
                time.sleep(random.uniform(0, 0.02))
        with lock:
            job_ids.extend(made)

    def writer(transactions: int) -> None:
        for _ in range(transactions):
            write(per_transaction)

    straggler = threading.Thread(target=write, args=(per_transaction, True))
    regular = (total - per_transaction) // per_transaction
    threads = [
        threading.Thread(target=writer, args=(regular // writers + (n < regular % writers),))
        for n in range(writers)
    ]
    started = time.monotonic()
    try:
        for thread in [*relays, straggler, *threads]:
            thread.start()
        for thread in [straggler, *threads]:
            thread.join()
        proj.jobs.testing.wait_for(lambda: published() == total, timeout=180, interval=0.2)
    finally:
        stop.set()
        for thread in relays:
            thread.join()
        for box in boxes:
            box.engine.dispose()
    elapsed = time.monotonic() - started

    assert len(job_ids) == total
    sent = drain(celery_app, queue)
    assert set(sent) == set(job_ids), "rows skipped, or unknown ids published"
    assert sent.most_common(1)[0][1] == 1, "a row was published twice"
    assert sum(box.published for box in boxes) >= total
    logging.getLogger(__name__).warning(
        "%s: %d rows written and relayed by %d relays in %.1f s (%s per relay)",
        stack.name,
        total,
        RELAYS,
        elapsed,
        [box.published for box in boxes],
    )


def listeners() -> list[int]:
    """Backend pids of this process's relay connections listening for jobs."""
    with session_scope() as session:
        found = session.scalars(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = :name AND query = :query"
            ),
            {"name": f"proj-relay:{os.getpid()}", "query": f"LISTEN {NOTIFY_CHANNEL}"},
        )
        return list(found)


def test_relay_listens_again_after_losing_its_connection(
    stack: Stack, celery_app: Celery, fast_path_off: None
) -> None:
    """With a poll interval far longer than the test waits, the relay
    publishes on NOTIFY; when its LISTEN connection is terminated, rows
    committed meanwhile are still published, it listens on a new connection,
    and NOTIFY wakes it again."""
    if not stack.on_postgres:
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite relays poll")
    queue = new_queue()
    stop = threading.Event()
    assert listeners() == []
    with relay(stack, celery_app, relay_poll_interval=600.0) as box:
        thread = threading.Thread(target=box.relay, args=(stop,))
        thread.start()
        try:
            [first] = proj.jobs.testing.wait_for(listeners)
            woken = record.apply_async_on_commit((0,), queue=queue)
            proj.jobs.testing.wait_for(lambda: job(woken).published_at is not None)

            with session_scope() as session:
                session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            missed = record.apply_async_on_commit((0,), queue=queue)
            proj.jobs.testing.wait_for(lambda: job(missed).published_at is not None)

            [second] = proj.jobs.testing.wait_for(lambda: [p for p in listeners() if p != first])
            again = record.apply_async_on_commit((0,), queue=queue)
            proj.jobs.testing.wait_for(lambda: job(again).published_at is not None)
            assert listeners() == [second]
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not thread.is_alive(), "the relay did not stop while waiting for a NOTIFY"
    assert listeners() == []
    assert drain(celery_app, queue) == Counter({woken: 1, missed: 1, again: 1})
    with session_scope() as session:  # nothing left for another test's worker
        session.execute(
            Job.__table__.update()
            .where(Job.id.in_([woken, missed, again]))
            .values(state=State.CANCELLED)
        )


def test_relay_only_polls_while_the_fast_path_is_on(
    stack: Stack, celery_app: Celery, fast_path_off: None
) -> None:
    """With the fast path on (the relay's settings), a NOTIFY would come while
    the row is still the fast path's: the relay does not LISTEN, and a job
    the fast path missed (off on the enqueuing side here) is published by
    polling once its grace is over, once."""
    if not stack.on_postgres:
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite relays poll")
    queue = new_queue()
    stop = threading.Event()
    with relay(stack, celery_app, relay_grace=0.5, relay_poll_interval=0.2) as box:
        thread = threading.Thread(target=box.relay, args=(stop,))
        thread.start()
        try:
            missed = record.apply_async_on_commit((0,), queue=queue)
            proj.jobs.testing.wait_for(lambda: job(missed).published_at is not None)
            assert listeners() == []
        finally:
            stop.set()
            thread.join(timeout=30)
    assert drain(celery_app, queue) == Counter({missed: 1})
    with session_scope() as session:  # nothing left for another test's worker
        session.execute(
            Job.__table__.update().where(Job.id == missed).values(state=State.CANCELLED)
        )
