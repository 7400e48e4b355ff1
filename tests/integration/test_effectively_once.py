"""Effectively once on real workers and brokers: a message delivered many times
takes effect once and the others are logged skips, a job's state only moves
forward, the reconciler hands back what the broker or a dead worker lost,
and periodic runs are deduplicated per schedule slot."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from logging.handlers import BufferingHandler
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import crontab
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

import proj.jobs.testing
from proj.db import Session, session_scope
from proj.jobs import Jobs, SqlAlchemyTask, ledger, outbox, publisher, shared_task, utcnow
from proj.jobs.models import Job, State, WorkerBeat
from proj.jobs.reconciler import reconcile
from proj.jobs.relay import make_relay
from proj.jobs.retry import retry_on
from proj.jobs.scheduler import SlotScheduler, slot_job_id
from proj.models import Invoice, User
from proj.tasks import send_welcome

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Stack

RUNNING: dict[str, threading.Event] = {}
RELEASE: dict[str, threading.Event] = {}
LONG_AGO = timedelta(hours=1)
FORWARD = {State.QUEUED: 0, State.RETRYING: 0, State.RUNNING: 1, State.SUCCEEDED: 2}


@shared_task(name="tests.once.record")
def record(user_id: int, key: str | None = None) -> int:
    """The effect: one invoice for ``user_id``; with ``key``, first say it is
    running and wait to be released (holding no lock, which on SQLite would
    stop every other writer)."""
    if key is not None:
        RUNNING[key].set()
        RELEASE[key].wait(timeout=60)
    Session.add(Invoice(user_id=user_id, amount_cents=1))
    return user_id


STARTS: dict[str, int] = {}


@shared_task(name="tests.once.slow_first")
def slow_first(user_id: int, key: str) -> int:
    """The effect, as ``record``'s; the first run of ``key`` waits to be
    released before it writes it, the others do not wait."""
    STARTS[key] = STARTS.get(key, 0) + 1
    if STARTS[key] == 1:
        RUNNING[key].set()
        RELEASE[key].wait(timeout=60)
    Session.add(Invoice(user_id=user_id, amount_cents=1))
    return user_id


class Hiccup(Exception):
    """A made-up error ``hiccups`` names in ``retry_on``."""


@shared_task(name="tests.once.hiccups", bind=True)
@retry_on(Hiccup, max_retries=2, backoff=0.3, max_backoff=0.3, jitter=False)
def hiccups(self: SqlAlchemyTask, user_id: int, failures: int) -> int:
    """Raise the named error on the first ``failures`` attempts; then the effect."""
    if self.request.retries < failures:
        raise Hiccup(f"hiccup on attempt {self.request.retries + 1}")
    Session.add(Invoice(user_id=user_id, amount_cents=1))
    return user_id


def new_user() -> int:
    with session_scope() as session:
        user = User(email=f"once-{uuid.uuid4().hex}@example.com")
        session.add(user)
        session.flush()
        return user.id


def effects(user_id: int) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count(Invoice.id)).filter_by(user_id=user_id)) or 0)


job = proj.jobs.testing.job


def insert_job(user_id: int, **values: Any) -> str:
    """A ledger row for ``record(user_id)``, with ``values`` set."""
    job_id = str(uuid.uuid4())
    with session_scope() as session:
        row = Job(id=job_id, name=record.name, args=[user_id], kwargs={}, options={})
        row.max_attempts = 3
        for name, value in values.items():
            setattr(row, name, value)
        session.add(row)
    return job_id


def message(job_id: str) -> dict[str, Any]:
    row = job(job_id)
    return {
        "id": row.id,
        "name": row.name,
        "args": row.args,
        "kwargs": row.kwargs,
        "options": row.options,
        "retries": 0,
    }


def queue_size(celery_app: Celery, queue: str) -> int:
    """Messages ready in ``queue`` (declared if missing, as Celery declares it)."""
    with celery_app.connection_for_write() as connection:
        bound = celery_app.amqp.queues[queue](connection.default_channel)
        bound.declare()
        return int(bound.queue_declare().message_count)


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


def skips(handler: BufferingHandler, job_id: str) -> int:
    return sum(
        1
        for r in list(handler.buffer)
        if job_id in r.getMessage() and "skipping this delivery" in r.getMessage()
    )


@contextmanager
def watched_states(job_id: str) -> Iterator[list[str]]:
    """The states a job's row goes through while the block runs, as seen by
    reading it every 5 ms from another thread."""
    states: list[str] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            state = job(job_id).state
            if not states or states[-1] != state:
                states.append(state)
            watching.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield states
    finally:
        watching.set()
        watcher.join()


def test_five_deliveries_one_effect_four_skips(purged: Celery, task_log: BufferingHandler) -> None:
    """The same message delivered 5 times to 4 worker threads: one run takes
    effect, the four others are acknowledged and logged as skips (while it
    runs and after), and the row's state only moves forward."""
    user_id = new_user()
    key = uuid.uuid4().hex
    RUNNING[key], RELEASE[key] = threading.Event(), threading.Event()
    job_id = insert_job(user_id, kwargs={"key": key}, published_at=utcnow())
    try:
        with (
            watched_states(job_id) as states,
            proj.jobs.testing.worker(purged, pool="threads", concurrency=4),
        ):
            with purged.producer_or_acquire() as producer:
                for _ in range(5):
                    publisher.send(purged, message(job_id), producer)
            assert RUNNING[key].wait(timeout=30)
            proj.jobs.testing.wait_for(lambda: skips(task_log, job_id) >= 4, timeout=60)
            RELEASE[key].set()
            proj.jobs.testing.wait_for(lambda: job(job_id).state == State.SUCCEEDED)
            proj.jobs.testing.wait_for(lambda: queue_size(purged, "celery") == 0)
    finally:
        RELEASE[key].set()

    assert effects(user_id) == 1
    assert skips(task_log, job_id) == 4
    done = job(job_id)
    assert (done.attempts, done.result) == (1, user_id)
    assert states[0] == State.QUEUED and states[-1] == State.SUCCEEDED and State.RUNNING in states
    ranks = [FORWARD[State(state)] for state in states]
    assert ranks == sorted(ranks), states


@pytest.mark.parametrize(
    ("failures", "state", "effect"), [(2, State.SUCCEEDED, 1), (5, State.FAILED, 0)]
)
def test_ledger_counts_retries_up_to_the_maximum(
    purged: Celery, failures: int, state: State, effect: int
) -> None:
    """A job retried on a named error goes through ``retrying`` and runs again
    under the same id; its ledger attempts count every run, and after its
    maximum (3 here) it ends ``failed`` with the error instead of retrying."""
    user_id = new_user()
    job_id = hiccups.apply_async_on_commit((user_id, failures))
    with watched_states(job_id) as states, proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for(lambda: job(job_id).state in (State.SUCCEEDED, State.FAILED))
    done = job(job_id)
    assert (done.state, done.attempts, done.max_attempts) == (state, 3, 3)
    assert effects(user_id) == effect
    assert State.RETRYING in states
    if state == State.FAILED:
        assert "hiccup on attempt 3" in (done.error or "")
    else:
        assert done.error is None and done.result == user_id


def dead_pid() -> int:
    """The id of a process that has ended."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(ended.stdout)


def publish_owed(stack: Stack, celery_app: Celery) -> int:
    """What one relay pass with no grace publishes."""
    relay = make_relay(celery_app, replace(stack.settings.jobs, relay_grace=0.0))
    try:
        return relay.relay_once()
    finally:
        relay.engine.dispose()


@pytest.mark.parametrize("state", [State.QUEUED, State.RETRYING])
def test_reconciler_sends_a_lost_message_again(stack: Stack, purged: Celery, state: State) -> None:
    """A waiting job published long ago whose message the broker lost (its
    queue is empty) is handed back to the relay, and then runs once."""
    user_id = new_user()
    job_id = record.apply_async_on_commit((user_id,))
    proj.jobs.testing.wait_for(lambda: job(job_id).published_at is not None)
    assert queue_size(purged, "celery") == 1
    purged.control.purge()  # the broker loses it
    with session_scope() as session:
        past = utcnow() - LONG_AGO
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=state, created_at=past, available_at=past, published_at=past)
        )

    result = purged.tasks["proj.reconcile_jobs"].apply().get()

    assert result["resent"] >= 1
    assert job(job_id).published_at is None
    assert publish_owed(stack, purged) >= 1
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for(lambda: job(job_id).state == State.SUCCEEDED)
    assert (effects(user_id), job(job_id).attempts) == (1, 1)


def test_reconciler_takes_back_a_dead_workers_job(stack: Stack, purged: Celery) -> None:
    """A job marked running for long by a run that is over (its worker is
    gone) goes back to ``retrying`` and runs again; one a live worker is
    really running is left alone."""
    hostname = f"live-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    past = utcnow() - LONG_AGO
    running = {"state": State.RUNNING, "attempts": 1, "started_at": past, "published_at": past}
    lost_user, kept_user = new_user(), new_user()
    lost = insert_job(lost_user, worker=f"gone@{socket.gethostname()}:{dead_pid()}", **running)
    key = uuid.uuid4().hex
    RUNNING[key], RELEASE[key] = threading.Event(), threading.Event()
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2, hostname=hostname):
        kept = record.apply_async_on_commit((kept_user, key))
        assert RUNNING[key].wait(timeout=30)
        beating = select(WorkerBeat).where(WorkerBeat.hostname == hostname)
        proj.jobs.testing.wait_for(lambda: one_row(beating))
        with session_scope() as session:  # running for long, as far as the ledger says
            session.execute(update(Job).where(Job.id == kept).values(started_at=past))
            session.execute(
                update(WorkerBeat)
                .where(WorkerBeat.hostname == hostname)
                .values(started_at=past - timedelta(minutes=1))
            )
        result = purged.tasks["proj.reconcile_jobs"].apply().get()
        assert result["abandoned"] >= 1
        assert job(kept).state == State.RUNNING
        assert (job(lost).state, job(lost).published_at) == (State.RETRYING, None)
        RELEASE[key].set()
        publish_owed(stack, purged)
        proj.jobs.testing.wait_for(lambda: job(lost).state == State.SUCCEEDED)
        proj.jobs.testing.wait_for(lambda: job(kept).state == State.SUCCEEDED)
    assert (effects(lost_user), job(lost).attempts) == (1, 2)
    assert (effects(kept_user), job(kept).attempts) == (1, 1)
    assert history(lost) == [(1, "retrying", "the worker running it stopped answering")]
    assert history(kept) == []


def history(job_id: str) -> list[tuple[int, str, str | None]]:
    """The job's attempts that ended in an error: number, outcome, error."""
    with session_scope() as session:
        return [(a.attempt, a.outcome, a.error) for a in ledger.attempts_of(session, job_id)]


def test_a_run_whose_job_was_taken_back_cannot_commit(
    stack: Stack, purged: Celery, task_log: BufferingHandler
) -> None:
    """A live run whose worker missed its heartbeats (a busy solo pool, say)
    has its job taken back by the reconciler; a second run claims and
    completes it; then the first run reaches its commit. The ledger refuses
    it: its transaction rolls back with its effect, and it says why. One
    effect, one success, by the second attempt."""
    hostname = f"slow-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    user_id, key = new_user(), uuid.uuid4().hex
    RUNNING[key], RELEASE[key] = threading.Event(), threading.Event()
    past = utcnow() - LONG_AGO
    try:
        with proj.jobs.testing.worker(purged, pool="threads", concurrency=2, hostname=hostname):
            job_id = slow_first.apply_async_on_commit((user_id, key))
            assert RUNNING[key].wait(timeout=30)
            beating = select(WorkerBeat).where(WorkerBeat.hostname == hostname)
            proj.jobs.testing.wait_for(lambda: one_row(beating))
            # Its worker began before the run and its heartbeats stopped long
            # ago: the heartbeat's age alone takes the job back (the broker,
            # asked, would say the run is going on).
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == job_id).values(started_at=past))
                session.execute(
                    update(WorkerBeat)
                    .where(WorkerBeat.hostname == hostname)
                    .values(beat_at=past, started_at=past - timedelta(minutes=1))
                )
                taken = reconcile(session, purged, stack.settings.jobs.stale_after)
            assert taken["abandoned"] == 1
            publish_owed(stack, purged)
            proj.jobs.testing.wait_for(lambda: job(job_id).state == State.SUCCEEDED)
            RELEASE[key].set()
            proj.jobs.testing.wait_for(lambda: taken_back(task_log, job_id))
    finally:
        RELEASE[key].set()

    assert effects(user_id) == 1
    done = job(job_id)
    assert (done.state, done.attempts, done.result) == (State.SUCCEEDED, 2, user_id)
    assert STARTS[key] == 2
    assert history(job_id) == [(1, "retrying", "the worker running it stopped answering")]


def taken_back(handler: BufferingHandler, job_id: str) -> bool:
    return any(
        job_id in record.getMessage() and "given to another run" in record.getMessage()
        for record in list(handler.buffer)
    )


def one_row(query: Any) -> Any:
    with session_scope() as session:
        return session.execute(query).first()


def test_reconciler_goes_by_heartbeats(stack: Stack, purged: Celery) -> None:
    """Running jobs of workers on another machine (no pid to check, and no
    broker asked: on the embedded stack none can be): one whose worker's last
    heartbeat is older than ``PROJ_STALE_AFTER`` is taken back, and so is one
    claimed before its worker's current incarnation began."""
    past = utcnow() - LONG_AGO
    hosts = {name: f"{name}-{uuid.uuid4().hex[:8]}@elsewhere" for name in ("dead", "new")}
    with session_scope() as session:
        for name, host in hosts.items():
            session.add(
                WorkerBeat(
                    hostname=host,
                    pid=1,
                    started_at=utcnow() if name == "new" else past,
                    beat_at=past if name == "dead" else utcnow(),
                )
            )
    running = {"state": State.RUNNING, "attempts": 1, "started_at": past, "published_at": past}
    claimed = {
        name: insert_job(new_user(), worker=f"{host}:4242", **running)
        for name, host in hosts.items()
    }
    result = purged.tasks["proj.reconcile_jobs"].apply().get()
    assert result["abandoned"] >= 2
    states = {name: job(job_id).state for name, job_id in claimed.items()}
    assert states == {"dead": State.RETRYING, "new": State.RETRYING}


def test_slot_job_id_is_per_entry_and_slot() -> None:
    """Two beats' copies of an entry get the same job id in one slot, and
    different ids in different slots, for different tasks, or for another
    entry of the same task."""
    every_minute = timedelta(minutes=1)
    one = ScheduleEntry(name="a", task="tests.once.tick", schedule=every_minute)
    other = ScheduleEntry(
        name="a",
        task="tests.once.tick",
        schedule=every_minute,
        last_run_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    start = datetime(2030, 1, 1, 12, 0, 5, tzinfo=UTC)
    assert slot_job_id(one, start) == slot_job_id(other, start + timedelta(seconds=50))
    assert slot_job_id(one, start) != slot_job_id(other, start + timedelta(seconds=60))
    other_task = ScheduleEntry(name="a", task="tests.once.tock", schedule=every_minute)
    assert slot_job_id(one, start) != slot_job_id(other_task, start)
    other_entry = ScheduleEntry(name="b", task="tests.once.tick", schedule=every_minute)
    assert slot_job_id(one, start) != slot_job_id(other_entry, start)
    cron = ScheduleEntry(name="d", task="tests.once.tick", schedule=crontab(minute="*"))
    assert slot_job_id(cron, start) == slot_job_id(cron, start + timedelta(seconds=50))
    assert slot_job_id(cron, start) != slot_job_id(cron, start + timedelta(minutes=1))


def two_beats(celery_app: Celery, tmp_path: Path) -> list[SlotScheduler]:
    """Two beat schedulers on ``celery_app``, each with a schedule file of its own."""
    return [
        SlotScheduler(app=celery_app, schedule_filename=str(tmp_path / f"beat{n}"), lazy=True)
        for n in (1, 2)
    ]


def test_two_beats_send_one_run_per_slot(celery_app: Celery, tmp_path: Path) -> None:
    """Two schedulers sending the same entry in the same slot make one ledger
    row and one message; enqueuing that slot's id again is an IntegrityError."""
    task = f"tests.once.tick.{uuid.uuid4().hex}"
    queue = f"tests.once.{uuid.uuid4().hex}"
    decade = timedelta(days=3650)  # the slot will not change during the test
    beats = two_beats(celery_app, tmp_path)
    entries = [
        ScheduleEntry(
            name="tick", task=task, schedule=decade, options={"queue": queue}, app=celery_app
        )
        for _ in beats
    ]

    sent = [
        beat.apply_async(entry, advance=False) for beat, entry in zip(beats, entries, strict=True)
    ]

    assert sent[0] is not None and sent[1] is None
    job_id = sent[0].id
    with pytest.raises(IntegrityError), session_scope() as session:
        outbox.enqueue(
            session,
            Jobs.of(celery_app),
            task,
            [],
            {},
            max_attempts=1,
            options={"queue": queue, "task_id": job_id},
        )
    with session_scope() as session:
        assert session.scalar(select(func.count(Job.id)).where(Job.name == task)) == 1
    assert Jobs.of(celery_app).flush()
    assert job(job_id).published_at is not None
    assert queue_size(celery_app, queue) == 1


def test_two_entries_of_one_task_each_run_once_a_slot(celery_app: Celery, tmp_path: Path) -> None:
    """Entries "report-eu" and "report-us", both for one task with other
    arguments and due in the same slot, with two beats running: each runs once."""
    task = f"tests.once.report.{uuid.uuid4().hex}"
    queue = f"tests.once.{uuid.uuid4().hex}"
    decade = timedelta(days=3650)  # the slot will not change during the test
    beats = two_beats(celery_app, tmp_path)
    sent = [
        beat.apply_async(
            ScheduleEntry(
                name=f"report-{region}",
                task=task,
                args=[region],
                schedule=decade,
                options={"queue": queue},
                app=celery_app,
            ),
            advance=False,
        )
        for beat in beats
        for region in ("eu", "us")
    ]

    assert [result is not None for result in sent] == [True, True, False, False]
    with session_scope() as session:
        rows = session.execute(select(Job.args).where(Job.name == task)).scalars().all()
    assert sorted(args[0] for args in rows) == ["eu", "us"]
    assert Jobs.of(celery_app).flush()
    assert queue_size(celery_app, queue) == 2


def test_beat_and_delay_on_commit_give_a_job_the_same_attempts(
    celery_app: Celery, tmp_path: Path
) -> None:
    """One rule for ``max_attempts``: a task's ``retry_on`` retries + 1 (8 + 1
    for ``send_welcome``) whether beat sends it or ``delay_on_commit`` does
    (beat used ``PROJ_MAX_ATTEMPTS``, 3)."""
    beat = SlotScheduler(app=celery_app, schedule_filename=str(tmp_path / "beat"), lazy=True)
    entry = ScheduleEntry(
        name="welcome",
        task="proj.tasks.send_welcome",
        args=[0],
        schedule=timedelta(days=3650),
        options={"queue": f"tests.once.{uuid.uuid4().hex}"},
        app=celery_app,
    )
    sent = beat.apply_async(entry, advance=False)
    assert sent is not None
    by_hand = send_welcome.apply_async_on_commit((0,), queue=entry.options["queue"])
    assert job(sent.id).max_attempts == job(by_hand).max_attempts == 9
