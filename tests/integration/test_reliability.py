"""Reliability of the ledger on real stacks: a job the broker refuses does not
hold up the relay, unique jobs, stopping a running job, every failed
attempt kept, callbacks and oversize arguments refused at enqueue, and the
reconciler's bound on attempts."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from kombu import Exchange, Queue
from kombu.exceptions import BatchPublishError
from sqlalchemy import create_engine, func, make_url, select, text, update

import proj.jobs.testing
from proj.celery import make_celery
from proj.db import Session, session_scope
from proj.db import db as web_db
from proj.jobs import (
    TRANSIENT_ERRORS,
    Jobs,
    SqlAlchemyTask,
    TaskArgumentError,
    context,
    ledger,
    retry_on,
    shared_task,
    utcnow,
)
from proj.jobs.models import Job, State
from proj.jobs.relay import Relay, make_relay
from proj.jobs.testing.faults import TcpProxy
from proj.models import Invoice, User
from proj.web import create_app

if TYPE_CHECKING:
    from conftest import Stack

job = proj.jobs.testing.job
STARTED: dict[str, threading.Event] = {}


class Wobble(Exception):
    """The error ``always_wobbles`` raises, and retries."""


@shared_task(name="tests.reliability.note", bind=True)
def note(self: SqlAlchemyTask, email: str) -> str:
    Session.add(User(email=email))
    return email


@shared_task(name="tests.reliability.always_wobbles", bind=True)
@retry_on(Wobble, max_retries=2, backoff=0.05, max_backoff=0.05, jitter=False)
def always_wobbles(self: SqlAlchemyTask) -> None:
    raise Wobble(f"wobble on attempt {self.request.retries + 1}")


@shared_task(name="tests.reliability.patient", bind=True)
def patient(self: SqlAlchemyTask, email: str, key: str) -> str:
    """Write a user, then check every 50 ms whether to stop (for up to 30 s)."""
    Session.add(User(email=email))
    Session.flush()
    STARTED[key].set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        self.check_cancelled()
        time.sleep(0.05)
    return email


def new_email() -> str:
    return f"reliability-{uuid.uuid4().hex}@example.com"


def signed_up(email: str) -> bool:
    with session_scope() as session:
        return session.scalar(select(User.id).filter_by(email=email)) is not None


@pytest.fixture
def fast_path_off(celery_app: Celery) -> object:
    jobs = Jobs.of(celery_app)
    settings = jobs.settings
    jobs.settings = replace(settings, outbox_fast_path=False)
    yield None
    jobs.settings = settings


def test_a_job_the_broker_cannot_take_does_not_hold_up_the_others(
    stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """With the fast path off, a job whose message cannot be sent (its
    ``expires`` is no date) is the oldest owed row; one relay pass fails it
    with the reason and publishes the five behind it, which run."""
    relay = make_relay(purged, replace(Jobs.of(purged).settings, relay_grace=0.0))
    try:
        while relay.relay_once():  # what earlier tests left owed, due by now
            pass
        purged.control.purge()
        bad = note.apply_async_on_commit((new_email(),), expires="not a date")
        emails = [new_email() for _ in range(5)]
        good = [note.apply_async_on_commit((email,)) for email in emails]
        assert relay.relay_once() == 5
        assert relay.relay_once() == 0  # nothing left owed: the bad row is not retried
    finally:
        relay.engine.dispose()
    failed = job(bad)
    assert failed.state == State.FAILED
    assert (failed.error or "").startswith("not published: ValueError")
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        for job_id in good:
            proj.jobs.testing.wait_for_state(job_id, State.SUCCEEDED)
    assert all(signed_up(email) for email in emails)


def test_a_message_rabbitmq_refuses_fails_its_job_only(
    stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """A queue whose policy refuses messages over 1,000 bytes (reject-publish):
    the oversize job at the head of the relay's batch is nacked and fails; the
    small ones behind it are confirmed and published."""
    if stack.name != "pg-rabbit":
        pytest.skip("publisher confirms and queue policies are RabbitMQ's")
    vhost = stack.env["CELERY_BROKER_URL"].rsplit("/", 1)[1]
    queue = f"tests.small.{uuid.uuid4().hex}"
    policy = '{"max-length-bytes": 1000, "overflow": "reject-publish"}'
    subprocess.run(
        ["rabbitmqctl", "-q", "set_policy", "-p", vhost, "small", "^tests\\.small\\.", policy],
        check=True,
        capture_output=True,
        timeout=60,
    )
    big = note.apply_async_on_commit(("x" * 5000,), queue=queue)
    small = [note.apply_async_on_commit((new_email(),), queue=queue) for _ in range(3)]
    relay = make_relay(purged, replace(Jobs.of(purged).settings, relay_grace=0.0))
    try:
        assert relay.relay_once() == 3
    finally:
        relay.engine.dispose()
    assert job(big).state == State.FAILED
    assert "RabbitMQ refused the message" in (job(big).error or "")
    assert [job(s).published_at is not None for s in small] == [True] * 3


def test_a_message_that_makes_rabbitmq_close_the_channel_fails_its_job_only(
    stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """RabbitMQ closes the channel on a message over its ``max_message_size``
    (set to 64 KiB here, for new channels, and set back): the batch is sent
    again one message at a time, the job that closed the channel fails with
    the reason, and the three behind it are published."""
    if stack.name != "pg-rabbit":
        pytest.skip("a channel closed by the broker is RabbitMQ's")
    bad = note.apply_async_on_commit(("x" * 100_000,))
    good = [note.apply_async_on_commit((new_email(),)) for _ in range(3)]
    relay = make_relay(purged, replace(Jobs.of(purged).settings, relay_grace=0.0))
    before = _rabbit_eval("application:get_env(rabbit, max_message_size).")
    try:
        _rabbit_eval("application:set_env(rabbit, max_message_size, 65536).")
        assert relay.relay_once() == 3
    finally:
        limit = before.removeprefix("{ok,").removesuffix("}") if before != "undefined" else None
        _rabbit_eval(
            f"application:set_env(rabbit, max_message_size, {limit})."
            if limit
            else "application:unset_env(rabbit, max_message_size)."
        )
        relay.engine.dispose()
    assert job(bad).state == State.FAILED
    assert "the broker closed the channel" in (job(bad).error or "")
    assert "larger than configured max size" in (job(bad).error or "")
    assert [job(g).published_at is not None for g in good] == [True] * 3


def _rabbit_eval(expression: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_a_queue_declared_with_other_arguments_holds_its_jobs_only(
    stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """RabbitMQ refuses to declare a job's queue as configured when it has
    other arguments (PRECONDITION_FAILED, and the channel closed): that job
    stays owed, neither failed nor published, the three behind it are
    published, and once the queue is gone the next pass publishes it."""
    if stack.name != "pg-rabbit":
        pytest.skip("queue arguments are RabbitMQ's")
    odd = f"tests.odd.{uuid.uuid4().hex}"
    with purged.connection_for_write() as connection:
        declared = Queue(odd, Exchange(odd), routing_key=odd, queue_arguments={"x-max-length": 5})
        declared(connection.default_channel).declare()
    bad = note.apply_async_on_commit((new_email(),), queue=odd)
    good = [note.apply_async_on_commit((new_email(),)) for _ in range(3)]
    relay = make_relay(purged, replace(Jobs.of(purged).settings, relay_grace=0.0))
    try:
        assert relay.relay_once() == 3
        assert (job(bad).state, job(bad).published_at) == (State.QUEUED, None)
        assert [job(g).published_at is not None for g in good] == [True] * 3
        with purged.connection_for_write() as connection:
            declared(connection.default_channel).delete()
        assert relay.relay_once() == 1
    finally:
        relay.engine.dispose()
    assert job(bad).published_at is not None
    with purged.connection_for_write() as connection:
        purged.amqp.queues[odd](connection.default_channel).delete()


def test_jobs_redis_will_not_take_stay_owed(
    stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """Redis refusing writes (out of memory under ``noeviction``; a replica
    made read-only answers alike) refuses the relay's whole batch: no job is
    failed nor marked published, and once Redis takes writes again the next
    pass publishes them all."""
    if stack.name != "pg-redis":
        pytest.skip("Redis's memory limit")
    owed = [note.apply_async_on_commit((new_email(),)) for _ in range(3)]
    server = redis.Redis.from_url(stack.env["CELERY_BROKER_URL"])
    limits = server.config_get("maxmemory*")
    relay = make_relay(purged, replace(Jobs.of(purged).settings, relay_grace=0.0))
    try:
        server.config_set("maxmemory-policy", "noeviction")
        server.config_set("maxmemory", 1)
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            relay.relay_once()
        assert [(job(i).state, job(i).published_at) for i in owed] == [(State.QUEUED, None)] * 3
    finally:
        server.config_set("maxmemory", limits["maxmemory"])
        server.config_set("maxmemory-policy", limits["maxmemory-policy"])
    try:
        assert relay.relay_once() == 3
    finally:
        relay.engine.dispose()
    assert all(job(i).published_at is not None for i in owed)


def test_a_batch_redis_does_not_write_stays_owed(
    stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """The relay pipelines a batch's writes to Redis; kombu sends them every
    1,000 messages and at the batch's end. Through a Redis user that may not
    push to lists (the queue is declared, the pipeline fails when sent), a
    pass over 1,200 jobs fails at the first send, halfway through, and raises:
    no job is failed nor marked published, and nothing is queued. A relay
    that may write then publishes the 1,200, each once."""
    if stack.name != "pg-redis":
        pytest.skip("Redis's access lists")
    with session_scope() as session:
        owed = [note.apply_async_on_commit((new_email(),), session=session) for _ in range(1200)]
    server = redis.Redis.from_url(stack.env["CELERY_BROKER_URL"])
    user, password = f"tests-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    server.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-lpush"],
    )
    url = stack.env["CELERY_BROKER_URL"].replace("redis://", f"redis://{user}:{password}@", 1)
    limited = make_celery(replace(stack.settings, broker_url=url))
    try:
        with pytest.raises(BatchPublishError):
            Relay(limited, Jobs.of(limited).engine, batch_size=1200).relay_once()
    finally:
        Jobs.of(limited).dispose()
        limited.close()
        server.acl_deluser(user)
        purged.set_current()  # make_celery made its app current
        purged.set_default()
    with session_scope() as session:
        left = session.execute(
            select(Job.state, func.count())
            .where(Job.id.in_(owed), Job.published_at.is_(None))
            .group_by(Job.state)
        ).all()
    assert left == [(State.QUEUED, 1200)]
    queue = purged.conf.task_default_queue
    assert server.llen(queue) == 0
    assert Relay(purged, Jobs.of(purged).engine, batch_size=1200).relay_once() == 1200
    assert server.llen(queue) == 1200
    purged.control.purge()


def test_a_unique_job_enqueued_fifty_times_at_once_is_one_job(purged: Celery) -> None:
    """Fifty transactions enqueue the same task with the same key at once:
    one row, every caller gets its id, none of their transactions fails; once
    the job has run, the key is free again."""
    key = f"unique-{uuid.uuid4().hex}"
    email = new_email()

    def enqueue(_: int) -> str:
        with session_scope() as session:
            return note.apply_async_on_commit((email,), session=session, unique=key)

    with ThreadPoolExecutor(max_workers=10) as pool:
        ids = set(pool.map(enqueue, range(50)))
    assert len(ids) == 1
    with session_scope() as session:
        rows = session.scalar(select(func.count(Job.id)).where(Job.unique_key == key))
    assert rows == 1
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for_state(ids.pop(), State.SUCCEEDED)
    assert note.apply_async_on_commit((email,), unique=key) not in ids


def test_unique_keys_are_each_tenants_own(purged: Celery) -> None:
    """Tenant A's waiting job holds its key for A only: tenant B, and a
    caller with no tenant, enqueuing the same task with the same key each
    get a job of their own, which their second try gets back."""
    key = f"unique-{uuid.uuid4().hex}"
    email = new_email()

    def enqueue(tenant: str | None) -> str:
        with context.tenant(tenant):
            return note.apply_async_on_commit((email,), unique=key)

    first = {tenant: enqueue(tenant) for tenant in ("a", "b", None)}
    again = {tenant: enqueue(tenant) for tenant in ("a", "b", None)}
    assert first == again
    assert len(set(first.values())) == 3
    with session_scope() as session:
        rows = session.execute(select(Job.tenant).where(Job.unique_key == key)).scalars()
        assert sorted(rows, key=str) == sorted(["a", "b", None], key=str)


def test_charging_again_while_a_charge_waits_answers_the_same_job(
    client: FlaskClient, purged: Celery
) -> None:
    """``POST /api/invoices/<id>/charge`` asked again while the first charge
    is waiting answers the same ``job_id``, and the invoice is charged once."""
    with session_scope() as session:
        user = User(email=new_email())
        session.add(user)
        session.flush()
        invoice = Invoice(user_id=user.id, amount_cents=1234)
        session.add(invoice)
        session.flush()
        invoice_id = invoice.id
    answers = [client.post(f"/api/invoices/{invoice_id}/charge") for _ in range(3)]
    assert [a.status_code for a in answers] == [202] * 3
    assert len({a.get_json()["job_id"] for a in answers}) == 1
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for_state(answers[0].get_json()["job_id"], State.SUCCEEDED)
    assert client.get(f"/api/invoices/{invoice_id}").get_json()["status"] == "charged"


def test_a_running_job_asked_to_stop_ends_cancelled(
    stack: Stack, client: FlaskClient, purged: Celery
) -> None:
    """Cancel on a running job that checks: 202, then the job stops at its next
    check, its work rolls back, and it ends ``cancelled`` with one attempt."""
    if not stack.on_postgres:
        pytest.skip("SQLite has one writer: the job's open write would hold the cancel up")
    key, email = uuid.uuid4().hex, new_email()
    STARTED[key] = threading.Event()
    job_id = patient.apply_async_on_commit((email, key))
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        assert STARTED[key].wait(timeout=30)
        assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 202
        stopped = proj.jobs.testing.wait_for_state(job_id, State.CANCELLED, timeout=10)
    assert stopped.attempts == 1 and stopped.finished_at is not None
    assert not signed_up(email)


def test_every_failed_attempt_is_kept(client: FlaskClient, purged: Celery) -> None:
    """Three failing attempts: ``errors`` has three entries, oldest first, each
    with its error, traceback, worker and times; the last one failed the job."""
    job_id = always_wobbles.apply_async_on_commit()
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for_state(job_id, State.FAILED)
    answer = client.get(f"/api/jobs/{job_id}").get_json()
    errors = answer["errors"]
    assert [(e["attempt"], e["outcome"]) for e in errors] == [
        (1, "retrying"),
        (2, "retrying"),
        (3, "failed"),
    ]
    for n, entry in enumerate(errors, start=1):
        assert f"wobble on attempt {n}" in entry["error"]
        assert "Wobble" in entry["traceback"]
        assert entry["worker"] and entry["started_at"] and entry["finished_at"]


def test_canvas_options_and_oversize_arguments_are_refused_at_enqueue(celery_app: Celery) -> None:
    """Celery's inner canvas options (``chain``, ``chord``) on a single job are
    refused, not dropped, naming ``enqueue_on_commit``; arguments over
    ``PROJ_MAX_MESSAGE_SIZE`` too. No row is written."""
    before = count_jobs()
    with pytest.raises(TaskArgumentError, match="chain cannot go on a single ledger job"):
        note.apply_async_on_commit((new_email(),), chain=[note.s(new_email())])
    with pytest.raises(TaskArgumentError, match="enqueue_on_commit"):
        note.apply_async_on_commit((new_email(),), chord=note.s(new_email()))
    too_big = Jobs.of(celery_app).settings.max_message_size + 1
    with pytest.raises(TaskArgumentError, match="PROJ_MAX_MESSAGE_SIZE"):
        note.apply_async_on_commit(("x" * too_big,))
    assert count_jobs() == before


def count_jobs() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count(Job.id))) or 0)


def test_the_reconciler_fails_a_lost_job_past_its_maximum(purged: Celery) -> None:
    """A running job on its last attempt whose worker is gone: the reconciler
    moves it to ``failed`` (not ``retrying``), keeping the attempt's error."""
    job_id = note.apply_async_on_commit((new_email(),), queue=f"tests.{uuid.uuid4().hex}")
    past = utcnow() - timedelta(hours=1)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=State.RUNNING,
                attempts=3,
                max_attempts=3,
                started_at=past,
                worker=f"gone@{socket.gethostname()}:{dead_pid()}",
            )
        )
    result = purged.tasks["proj.reconcile_jobs"].apply().get()
    assert result["abandoned"] >= 1
    lost = job(job_id)
    assert (lost.state, lost.finished_at is not None) == (State.FAILED, True)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@shared_task(name="tests.reliability.sleepy", bind=True)
@retry_on(TRANSIENT_ERRORS, max_retries=1, backoff=0.05, max_backoff=0.05, jitter=False)
def sleepy(self: SqlAlchemyTask, seconds: float) -> None:
    Session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})


def test_a_statement_past_the_workers_timeout_is_a_transient_error(
    stack: Stack, celery_app: Celery
) -> None:
    """With ``PROJ_WORKER_STATEMENT_TIMEOUT`` at 0.3 s, a task's 3 s statement is
    cancelled by PostgreSQL; the task retries it (a transient error), and
    fails once its attempts are used up, each attempt's error kept."""
    if not stack.on_postgres:
        pytest.skip("statement_timeout is PostgreSQL's")
    jobs = replace(stack.settings.jobs, worker_statement_timeout=0.3)
    own = make_celery(replace(stack.settings, jobs=jobs))
    try:
        job_id = own.tasks["tests.reliability.sleepy"].apply_async_on_commit((3,))
        with proj.jobs.testing.worker(own):
            failed = proj.jobs.testing.wait_for_state(job_id, State.FAILED, celery_app=own)
        with Jobs.of(own).session_scope() as session:
            errors = [attempt.error or "" for attempt in ledger.attempts_of(session, job_id)]
    finally:
        Jobs.of(own).dispose()
        own.close()
        celery_app.set_current()
        celery_app.set_default()
    assert failed.attempts == 2
    assert len(errors) == 2 and all("statement timeout" in error for error in errors)


def test_a_request_waiting_on_a_lock_answers_503(
    stack: Stack, celery_app: Celery, make_token: Callable[..., str]
) -> None:
    """With ``PROJ_LOCK_TIMEOUT`` at 0.5 s, a sign-up that waits for a lock
    another connection holds gets a JSON 503 instead of waiting; once the lock
    is gone, the same request succeeds."""
    if not stack.on_postgres:
        pytest.skip("lock_timeout is PostgreSQL's")
    installed = Jobs.of(celery_app)
    settings = installed.settings
    installed.settings = replace(settings, lock_timeout=0.5)
    holder = create_engine(stack.settings.database_url)
    try:
        flask_app = create_app(stack.settings, celery_app)
        client = flask_app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(flask_app)}"
        with holder.connect() as connection, connection.begin():
            connection.execute(text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
            refused = client.post("/api/users", json={"email": new_email()})
        accepted = client.post("/api/users", json={"email": new_email()})
        with flask_app.app_context():
            web_db.engine.dispose()
    finally:
        installed.settings = settings
        holder.dispose()
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "database_unavailable"
    assert accepted.status_code == 201


def test_a_silent_database_gets_a_503_not_a_hang(
    stack: Stack, celery_app: Celery, make_token: Callable[..., str]
) -> None:
    """The web tier's database behind a proxy: a sign-up succeeds; then the
    proxy keeps connections open and forwards nothing, and a sign-up on the
    pooled connection answers a JSON 503 (the client's deadline, not a hang);
    once the proxy forwards again, sign-ups succeed."""
    if not stack.on_postgres:
        pytest.skip("a database server to put behind the proxy: this stack runs SQLite")
    url = make_url(stack.settings.database_url)
    with TcpProxy((str(url.host), int(url.port or 5432))) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        settings = replace(
            stack.settings,
            web_answer_within=1.0,
            jobs=replace(stack.settings.jobs, database_url=through),
        )
        own = make_celery(settings)
        flask_app = create_app(settings, own)
        try:
            token = make_token(flask_app)
            first = answer_within(flask_app, token, 30)
            proxy.blackhole()
            silent = answer_within(flask_app, token, 30)
            proxy.restore()
            again = answer_within(flask_app, token, 30)
        finally:
            proxy.restore()
            with flask_app.app_context():
                web_db.engine.dispose()
            Jobs.of(own).dispose()
            own.close()
            celery_app.set_current()
            celery_app.set_default()
    assert first[0] == 201
    assert silent == (503, "database_unavailable")
    assert again[0] == 201


def answer_within(flask_app: Flask, token: str, seconds: float) -> tuple[int, str]:
    """A sign-up's status and error code (``""`` if none), with API token
    ``token``; fails if no answer comes within ``seconds``."""
    answers: list[tuple[int, str]] = []

    def sign_up() -> None:
        response = flask_app.test_client().post(
            "/api/users", json={"email": new_email()}, headers={"Authorization": f"Bearer {token}"}
        )
        body = response.get_json()
        answers.append((response.status_code, body.get("error", {}).get("code", "")))

    thread = threading.Thread(target=sign_up, daemon=True)
    thread.start()
    thread.join(seconds)
    assert answers, f"no answer in {seconds:g} s"
    return answers[0]
