"""Outages, with the real commands: the broker stopped under the web tier, Redis
restarted without persistence with jobs queued, PostgreSQL restarted under a
running worker, relay and web tier; and ``proj relay`` as a process of its own.

The servers taken down are the test's own (``servers``): a TCP proxy in front
of the stack's broker, a private ``redis-server``, a private PostgreSQL
cluster. The machine's shared servers are never stopped.
"""

from __future__ import annotations

import email
import json
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import kombu.pools
import pytest
import stacks
from celery import Celery
from e2e_tasks import create_effects_table, effects
from sqlalchemy import Engine, create_engine, orm, select
from subprocesses import BIN, Command, Commands, api_token, enqueue_effects

from proj.db import worker_engine
from proj.jobs import Jobs, utcnow
from proj.jobs.engine import resolve_url
from proj.jobs.models import Job, State
from proj.jobs.testing.faults import (
    PostgresCluster,
    RedisServer,
    TcpProxy,
    private_postgres_problem,
)
from proj.models import User

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

SIGNUPS = 200
REQUEST_TIMEOUT = 5.0
"""Seconds a sign-up may take while the broker is down. A sign-up takes
milliseconds; one caught in kombu's reconnection loop takes 6 s."""
QUEUED_IN_REDIS = 300
OUTAGE = 2.0
"""Seconds PostgreSQL stays down: several times a job's 0.3 s, so every job
running when it stopped, and some delivered meanwhile, meet the outage."""


def tag() -> str:
    return uuid.uuid4().hex[:10]


def server_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def through(url: str, port: int) -> str:
    """``url`` with its server replaced by ``127.0.0.1:port`` (a proxy's)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def request(
    method: str, url: str, token: str, body: dict[str, Any] | None = None, timeout: float = 30.0
) -> tuple[int, Any]:
    """A real HTTP request with API token ``token``; its status and JSON
    answer (errors included)."""
    sent = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method=method,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(sent, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def sign_up(base_url: str, token: str, address: str, timeout: float = 30.0) -> tuple[int, Any]:
    return request("POST", f"{base_url}/api/users", token, {"email": address}, timeout)


def mail_recipients(folder: Path) -> Counter[str]:
    """How many messages in ``folder`` went to each address."""
    return Counter(
        str(email.message_from_bytes(path.read_bytes())["To"]) for path in folder.glob("*.eml")
    )


def ledger(engine: Engine, *conditions: Any) -> list[Job]:
    """Ledger rows in ``engine``'s database (detached)."""
    with orm.Session(engine) as session:
        rows = list(session.scalars(select(Job).where(*conditions)))
        session.expunge_all()
        return rows


def welcome_jobs(engine: Engine, user_ids: set[int], since: datetime) -> list[Job]:
    rows = ledger(engine, Job.name == "proj.tasks.send_welcome", Job.created_at >= since)
    return [job for job in rows if job.args[0] in user_ids]


def states(engine: Engine, job_ids: list[str]) -> Counter[str]:
    return Counter(job.state for job in ledger(engine, Job.id.in_(job_ids)))


def all_succeeded(engine: Engine, job_ids: list[str]) -> Callable[[], bool]:
    return lambda: states(engine, job_ids) == Counter({State.SUCCEEDED: len(job_ids)})


def effect_counts(engine: Engine, run: str) -> Counter[int]:
    """How many times each job ``n`` of ``run`` took effect."""
    with engine.connect() as connection:
        rows = connection.execute(select(effects.c.n).where(effects.c.tag == run)).scalars()
        return Counter(rows)


def welcomed(engine: Engine, user_ids: set[int]) -> int:
    with engine.connect() as connection:
        query = select(User.id).where(User.id.in_(user_ids), User.welcomed_at.is_not(None))
        return len(connection.execute(query).all())


def test_signups_while_the_broker_is_down(
    stack: Stack, celery_app: Celery, commands: Commands, tmp_path: Path
) -> None:
    """The broker (behind a proxy the test stops) is down under a real web
    tier: 200 sign-ups all answer 201 at once (none waits for the broker; each
    logs that the relay will publish its job), and their ledger rows wait
    unpublished. Once the broker is back, the worker (disconnected too, as it
    goes through the same proxy) and its relay run all 200 welcome jobs
    within 30 s: every row ``succeeded`` after one attempt, every user
    welcomed, exactly one mail each."""
    broker_url = stack.settings.broker_url
    if not broker_url.startswith(("amqp:", "redis:")):
        pytest.skip("the SQLite broker is a file next to the database: it cannot be down alone")
    mail = tmp_path / "mail"
    engine = worker_engine()
    since = utcnow()
    with TcpProxy(server_address(broker_url)) as proxy:
        env = stack.process_env(
            CELERY_BROKER_URL=through(broker_url, proxy.port), PROJ_MAIL_URL=f"file://{mail}"
        )
        worker = commands.worker(env)
        web, url = commands.web(env)
        token = api_token(env)
        assert proxy.connections > 0, "the worker does not go through the proxy"
        proxy.stop()
        worker.wait_for_output("Connection to broker lost")

        run = tag()
        emails = [f"outage-{i}-{run}@e2e.test" for i in range(SIGNUPS)]

        def sign_up_now(address: str) -> tuple[int, Any]:
            try:
                return sign_up(url, token, address, REQUEST_TIMEOUT)
            except TimeoutError:
                raise AssertionError(
                    f"a sign-up waited more than {REQUEST_TIMEOUT:g} s for the broker"
                ) from None

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(sign_up_now, address) for address in emails]
            try:
                answers = [future.result() for future in futures]
            finally:
                pool.shutdown(cancel_futures=True)
        assert [status for status, _ in answers] == [201] * SIGNUPS
        user_ids = {user["id"] for _, user in answers}
        waiting = welcome_jobs(engine, user_ids, since)
        assert len(waiting) == SIGNUPS
        assert {(job.state, job.published_at) for job in waiting} == {(State.QUEUED, None)}
        assert web.output().count("committed but not published") == SIGNUPS

        proxy.start()
        worker.until(lambda: welcomed(engine, user_ids) == SIGNUPS, timeout=30)
        job_ids = [job.id for job in waiting]
        worker.until(all_succeeded(engine, job_ids))
        # Stopped while the broker is up: the test's outage is over.
        assert worker.stop() == 0
    done = ledger(engine, Job.id.in_(job_ids))
    assert {job.attempts for job in done} == {1}
    assert all(job.published_at is not None for job in done)
    sent = mail_recipients(mail)
    assert {address: sent[address] for address in emails} == dict.fromkeys(emails, 1)


def test_redis_restarted_without_persistence_loses_no_job(
    stack: Stack, celery_app: Celery, commands: Commands, tmp_path: Path
) -> None:
    """300 jobs are published to a private Redis with no worker running; Redis
    is killed and started again without them (no persistence). A worker, and
    beat running the reconciler every second (``PROJ_STALE_AFTER=2``), run all
    300: the reconciler sends the lost jobs again and each takes effect once,
    on its first attempt."""
    if stack.name == "pg-rabbit":
        pytest.skip("a RabbitMQ stack has no Redis: pg-redis runs this on PostgreSQL")
    engine = worker_engine()
    create_effects_table(engine)
    with RedisServer(tmp_path) as redis_server:
        env = stack.process_env(
            CELERY_BROKER_URL=redis_server.url,
            PROJ_RECONCILE_INTERVAL="1",
            PROJ_STALE_AFTER="2",
            PROJ_MAIL_URL=f"file://{tmp_path / 'mail'}",
        )
        run = tag()
        job_ids = enqueue_effects(env, run, QUEUED_IN_REDIS)
        queued = ledger(engine, Job.id.in_(job_ids))
        assert len(queued) == QUEUED_IN_REDIS
        assert {job.state for job in queued} == {State.QUEUED}
        assert all(job.published_at is not None for job in queued)
        assert redis_server.client().llen("celery") == QUEUED_IN_REDIS

        redis_server.kill()
        redis_server.start()
        assert redis_server.client().dbsize() == 0, "the restarted Redis kept data"

        worker = commands.worker(env)
        beat = commands.celery(
            "beat", "beat", "--loglevel=INFO", f"--schedule={tmp_path / 'beat'}", env=env
        )
        worker.until(all_succeeded(engine, job_ids), timeout=90)
        assert worker.stop() == 0
        assert beat.stop() == 0
    assert effect_counts(engine, run) == Counter(dict.fromkeys(range(QUEUED_IN_REDIS), 1))
    assert {job.attempts for job in ledger(engine, Job.id.in_(job_ids))} == {1}
    assert re.search(r"reconcile: sending again [1-9]\d* lost", worker.output())


@dataclass
class Restart:
    """What happened around a PostgreSQL restart (see :func:`postgres_restart`)."""

    engine: Engine
    worker: Command
    relay: Command
    run: str
    before: list[str]
    """Jobs enqueued before the restart, some of them running when it came."""
    later: list[str]
    """Jobs enqueued after the restart."""
    during: list[int]
    """Statuses of sign-ups while the server was down."""
    after: list[tuple[int, Any]]
    """Statuses and answers of sign-ups once it was back."""
    since: datetime


@pytest.fixture(scope="module")
def postgres_restart(stack: Stack, tmp_path_factory: Any) -> Iterator[Restart]:
    """PostgreSQL restarted under running processes. The server is a private
    cluster (``initdb`` in a temp folder, run as the postgres user), so it
    can really be stopped: ``pg_ctl stop -m fast`` ends every session and the
    server; ``pg_ctl start`` brings it back on the same port. On it, a new
    database migrated with ``proj db upgrade``; on it and a broker namespace
    of its own, a prefork worker (``PROJ_RELAY_IN_WORKER=0``), ``proj relay``
    and the web tier, all with the fast path off, so the relay publishes every
    job. 40 jobs of 0.3 s (``retry_on(TRANSIENT_ERRORS)``) are enqueued;
    once a few have run, the server stops for :data:`OUTAGE` seconds, with
    sign-ups meanwhile. Then 10 sign-ups and 20 more jobs."""
    if not stack.on_postgres:
        pytest.skip("the SQLite stack has no PostgreSQL server to restart")
    problem = private_postgres_problem()
    if problem:
        pytest.skip(problem)
    folder = tmp_path_factory.mktemp("postgres-restart")
    # A broker namespace of its own: this worker outlives the test that starts
    # it and must not take the other tests' messages.
    broker = stacks.rabbitmq_vhost() if stack.name == "pg-rabbit" else stacks.redis_database()
    with broker as broker_url, PostgresCluster() as cluster:
        url = cluster.create_database()
        env = stack.process_env(
            DATABASE_URL=url,
            CELERY_BROKER_URL=broker_url,
            CELERY_RESULT_BACKEND=f"db+{url}",
            PROJ_RELAY_IN_WORKER="0",
            PROJ_OUTBOX_FAST_PATH="0",
            PROJ_MAIL_URL=f"file://{folder / 'mail'}",
        )
        upgraded = subprocess.run(
            [str(BIN / "proj"), "db", "upgrade"], env=env, capture_output=True, text=True
        )
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        engine = create_engine(resolve_url(url), pool_pre_ping=True)
        commands = Commands(folder)
        try:
            create_effects_table(engine)
            worker = commands.worker(env)
            relay = commands.relay(env)
            _, base_url = commands.web(env)
            token = api_token(env)
            run = tag()
            before = enqueue_effects(env, f"{run}-before", 40, 0.3)
            worker.until(lambda: states(engine, before)[State.SUCCEEDED] >= 4, timeout=60)

            cluster.stop()
            relay.wait_for_output("lost the LISTEN connection")
            during = [sign_up(base_url, token, f"during-{i}-{run}@e2e.test")[0] for i in range(3)]
            time.sleep(OUTAGE)
            cluster.start()

            started = utcnow()
            after = [sign_up(base_url, token, f"after-{i}-{run}@e2e.test") for i in range(10)]
            later = enqueue_effects(env, f"{run}-after", 20, 0.0)
            yield Restart(engine, worker, relay, run, before, later, during, after, started)
        finally:
            commands.stop_all()
            engine.dispose()


def test_postgres_restart_relay_and_web_recover(postgres_restart: Restart) -> None:
    """After PostgreSQL restarts, the web tier answers every sign-up 201
    (during the outage, 503: the database is unavailable), and ``proj relay``
    listens again and publishes the jobs enqueued since (nothing else
    publishes here): each runs once."""
    restart = postgres_restart
    assert restart.during == [503] * 3
    assert [status for status, _ in restart.after] == [201] * 10
    restart.worker.until(all_succeeded(restart.engine, restart.later), timeout=60)
    user_ids = {user["id"] for _, user in restart.after}
    welcome_ids = [job.id for job in welcome_jobs(restart.engine, user_ids, restart.since)]
    assert len(welcome_ids) == 10
    restart.worker.until(all_succeeded(restart.engine, welcome_ids), timeout=60)
    assert effect_counts(restart.engine, f"{restart.run}-after") == Counter(
        dict.fromkeys(range(20), 1)
    )
    assert restart.relay.output().count("proj relay: publishing") == 1, "the relay restarted"
    assert restart.relay.popen.poll() is None


def test_postgres_restart_in_flight_jobs_retry_and_succeed(postgres_restart: Restart) -> None:
    """The jobs running when PostgreSQL went down retry once it is back, and
    every job enqueued before the restart ends ``succeeded``, taking effect
    exactly once."""
    restart = postgres_restart
    restart.worker.until(all_succeeded(restart.engine, restart.before), timeout=20)
    assert effect_counts(restart.engine, f"{restart.run}-before") == Counter(
        dict.fromkeys(range(40), 1)
    )
    jobs = ledger(restart.engine, Job.id.in_(restart.before))
    assert [job for job in jobs if job.attempts > 1], "no job was running when the server stopped"


def test_proj_relay_publishes_what_the_fast_path_left(
    stack: Stack, celery_app: Celery, commands: Commands
) -> None:
    """With the fast path off (``PROJ_OUTBOX_FAST_PATH=0``) and no relay in
    the worker (``PROJ_RELAY_IN_WORKER=0``), committed jobs wait unpublished,
    and a worker alone does not run them; ``proj relay`` publishes them, each
    runs once, and SIGTERM stops it cleanly, saying how many it published."""
    engine = worker_engine()
    create_effects_table(engine)
    env = stack.process_env(PROJ_OUTBOX_FAST_PATH="0", PROJ_RELAY_IN_WORKER="0")
    run = tag()
    job_ids = enqueue_effects(env, run, 30)
    worker = commands.worker(env)
    unpublished = ledger(engine, Job.id.in_(job_ids))
    assert {(job.state, job.published_at) for job in unpublished} == {(State.QUEUED, None)}

    relay = commands.relay(env)
    worker.until(all_succeeded(engine, job_ids), timeout=60)
    assert relay.stop(signal.SIGTERM) == 0
    assert effect_counts(engine, run) == Counter(dict.fromkeys(range(30), 1))
    assert all(job.published_at for job in ledger(engine, Job.id.in_(job_ids)))
    published = re.search(r"stopped after publishing (\d+) jobs", relay.output())
    assert published is not None and int(published[1]) >= 30, relay.output()


BLACKHOLE = 20.0
"""Seconds the database forwards nothing (connections open, no answer)."""


def test_a_silent_database_under_sign_up_load(
    stack: Stack, celery_app: Celery, commands: Commands, tmp_path: Path
) -> None:
    """Web and worker reach PostgreSQL through a proxy; while sign-ups keep
    coming (4 at a time), the proxy blackholes every connection for 20 s, then
    forwards again. Every sign-up answers within 15 s (a 201, or a JSON 503
    during the silence: none hangs); the web tier answers 201 again once the
    database is back; every user signed up is welcomed once, the jobs that met
    the silence retrying (``PROJ_WORKER_ANSWER_WITHIN=8``: a wait on the silent
    database is a transient error) and none left waiting or running. A claim
    whose answer the silence swallowed leaves its row ``running`` with no run
    behind it: the reconciler (run here every second, ``PROJ_STALE_AFTER`` 20 s)
    takes it back."""
    if not stack.on_postgres:
        pytest.skip("a database server to put behind the proxy: this stack runs SQLite")
    mail = tmp_path / "mail"
    engine = worker_engine()
    since = utcnow()
    database_url = stack.settings.database_url
    with TcpProxy(server_address(database_url)) as proxy:
        env = stack.process_env(
            DATABASE_URL=through(database_url, proxy.port),
            PROJ_MAIL_URL=f"file://{mail}",
            PROJ_WORKER_ANSWER_WITHIN="8",
        )
        worker = commands.worker(env)
        _, url = commands.web(env)
        token = api_token(env)
        run = tag()
        answers: list[tuple[str, int, Any]] = []
        stop = threading.Event()

        def keep_signing_up(lane: int) -> None:
            n = 0
            while not stop.is_set():
                address = f"silent-{lane}-{n}-{run}@e2e.test"
                try:
                    status, body = sign_up(url, token, address, timeout=15.0)
                except TimeoutError:
                    status, body = 0, {"error": {"code": "no answer in 15 s"}}
                answers.append((address, status, body))
                n += 1
                time.sleep(0.1)

        lanes = [threading.Thread(target=keep_signing_up, args=(lane,)) for lane in range(4)]
        for lane in lanes:
            lane.start()
        try:
            time.sleep(2)
            proxy.blackhole()
            blackholed_at = len(answers)
            time.sleep(BLACKHOLE)
            proxy.restore()
            restored_at = len(answers)
            time.sleep(5)
        finally:
            proxy.restore()
            stop.set()
            for lane in lanes:
                lane.join(timeout=30)
        statuses = Counter(status for _, status, _ in answers)
        assert set(statuses) <= {201, 503}, statuses
        during = answers[blackholed_at:restored_at]
        assert any(status == 503 for _, status, _ in during), "no 503 while the database was silent"
        assert all(
            body["error"]["code"] == "database_unavailable"
            for _, status, body in answers
            if status == 503
        )
        assert [status for _, status, _ in answers[-4:]] == [201] * 4, "not back after the silence"
        signed_up = {body["id"] for _, status, body in answers if status == 201}
        jobs_settings = Jobs.of(celery_app).settings
        Jobs.of(celery_app).settings = replace(jobs_settings, stale_after=20.0)
        try:

            def all_welcomed() -> bool:
                celery_app.tasks["proj.reconcile_jobs"].apply().get()
                time.sleep(1)
                return welcomed(engine, signed_up) == len(signed_up)

            worker.until(all_welcomed, timeout=150)
        finally:
            Jobs.of(celery_app).settings = jobs_settings
        jobs = welcome_jobs(engine, signed_up, since)
        worker.until(all_succeeded(engine, [job.id for job in jobs]), timeout=60)
        assert worker.stop() == 0
    # Welcomed once in the database; a mail whose job met the silence after
    # sending it (the commit of ``welcomed_at`` failed) is sent again: mail
    # has no idempotency key, as README says of effects outside the database.
    sent = mail_recipients(mail)
    addresses = [address for address, status, _ in answers if status == 201]
    assert all(sent[address] >= 1 for address in addresses)
    retried = {
        job.args[0] for job in ledger(engine, Job.id.in_([j.id for j in jobs])) if job.attempts > 1
    }
    twice = {body["id"] for address, status, body in answers if status == 201 and sent[address] > 1}
    assert twice <= retried, "a mail was sent twice by a job that ran once"


IN_FLIGHT = 500


def test_rabbitmq_restarted_with_jobs_in_flight(
    stack: Stack, celery_app: Celery, commands: Commands
) -> None:
    """500 jobs committed; while a worker drains them, RabbitMQ's application
    is stopped and started again (``rabbitmqctl stop_app``/``start_app``: its
    durable queues and persistent messages survive, every connection is cut).
    The worker reconnects; every job ends ``succeeded`` with its effect once
    (a message whose acknowledgement the restart lost is delivered again, and
    its claim skips it)."""
    if stack.name != "pg-rabbit":
        pytest.skip("restarts the machine's RabbitMQ: the pg-rabbit stack's")
    engine = worker_engine()
    create_effects_table(engine)
    env = stack.process_env()
    worker = commands.worker(env)
    run = tag()
    job_ids = enqueue_effects(env, run, IN_FLIGHT, seconds=0.01)
    worker.until(lambda: states(engine, job_ids)[State.SUCCEEDED] >= 50, timeout=60)
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    try:
        cut_off = states(engine, job_ids)
        time.sleep(2)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)
        # This process's pooled broker connections (kombu keeps its pools
        # process-wide) died with the restart.
        kombu.pools.reset()
        celery_app.close()
        celery_app.amqp._producer_pool = None  # Celery keeps the closed one otherwise
    assert cut_off[State.SUCCEEDED] < IN_FLIGHT, "the drain was over before the restart"
    worker.until(all_succeeded(engine, job_ids), timeout=180)
    assert effect_counts(engine, run) == Counter(dict.fromkeys(range(IN_FLIGHT), 1))
    assert worker.popen.poll() is None
