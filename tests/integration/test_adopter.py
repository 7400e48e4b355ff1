"""An application that is not proj's adopts proj.jobs as the tutorial shows: the
shop in ``tests/adopter/shop.py`` (its own Flask app, Flask-SQLAlchemy ``db``,
tables, Alembic history and Celery app), on PostgreSQL + RabbitMQ and
PostgreSQL + Redis, each test on a new database and broker.

What it gets: a job runs if and only if its view's transaction commits; tasks
run in its Flask app's context with ``db.session`` as the run's own session;
the relay, the reconciler and beat's slot dedupe work for its Celery app; its
database gets the ledger and nothing of the reference application; and
``import proj.jobs`` starts nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import stacks
from adopter.shop import UNPAID_FOR, Order, ShopBase, db, make_shop
from celery import Celery, signals
from celery._state import get_current_app
from celery.beat import ScheduleEntry
from celery.worker import WorkController
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, func, inspect, pool, select, text, update

import proj.jobs.testing
from proj.jobs import Job, Jobs, State, auth, utcnow
from proj.jobs.engine import resolve_url
from proj.jobs.migrations import VERSION_TABLE, upgrade
from proj.jobs.relay import make_relay
from proj.jobs.scheduler import SlotScheduler

REQUIRED = bool(os.environ.get("CI") or os.environ.get("PROJ_REQUIRE_SERVICES"))
BROKERS = {"pg-rabbit": stacks.rabbitmq_vhost, "pg-redis": stacks.redis_database}
SHOP_REVISION = "shop_0007"
"""The revision the shop's own Alembic history is at (its ``alembic_version`` row)."""
REFERENCE_TABLES = {"users", "invoices", "gateway_charges", "dead_letters"}
LONG_AGO = timedelta(hours=1)
TESTS = Path(__file__).resolve().parents[1]


@dataclass
class Shop:
    """The shop on a new database and broker."""

    flask_app: Flask
    celery_app: Celery
    jobs: Jobs
    database_url: str
    token: str
    """An operator's API token (the job API wants one on every request)."""

    @property
    def client(self) -> FlaskClient:
        """A test client that sends :attr:`token`."""
        made = self.flask_app.test_client()
        made.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {self.token}"
        return made

    def order(self) -> tuple[int, str]:
        """``POST /orders``: the new order's id and its payment's job id."""
        answer = self.client.post("/orders", json={"fail": False})
        assert answer.status_code == 201, answer.get_data(as_text=True)
        body: dict[str, Any] = answer.get_json()
        assert answer.headers["Location"] == f"/api/jobs/{body['job_id']}"
        return int(body["order_id"]), str(body["job_id"])

    def job(self, job_id: str) -> Job:
        return proj.jobs.testing.job(job_id, self.celery_app)

    def wait_until_succeeded(self, job_id: str) -> Job:
        return proj.jobs.testing.wait_for_state(
            job_id, State.SUCCEEDED, State.FAILED, celery_app=self.celery_app
        )

    def orders(self) -> dict[int, tuple[str, datetime | None]]:
        """Every order's status and payment time, as another connection sees them."""
        with self.jobs.session_scope() as session:
            rows = session.execute(select(Order.id, Order.status, Order.paid_at))
            return {order_id: (status, paid_at) for order_id, status, paid_at in rows}

    def job_ids(self, name: str | None = None) -> list[str]:
        """The ids of the ledger's jobs (of task ``name``)."""
        query = select(Job.id) if name is None else select(Job.id).where(Job.name == name)
        with self.jobs.session_scope() as session:
            return list(session.scalars(query))

    def queued_messages(self, queue: str = "celery") -> int:
        """Messages ready in ``queue`` (declared if missing, as Celery declares it)."""
        with self.celery_app.connection_for_write() as connection:
            bound = self.celery_app.amqp.queues[queue](connection.default_channel)
            bound.declare()
            declared: Any = bound.queue_declare()
            return int(declared.message_count)

    def worker(self) -> AbstractContextManager[WorkController]:
        """An in-process worker for the shop's Celery app (it makes that app current)."""
        return proj.jobs.testing.worker(self.celery_app, pool="threads", concurrency=2)


def prepare_database(url: str) -> None:
    """The shop's database as its own deployment leaves it: its Alembic history
    (faked: an ``alembic_version`` row), its tables, then the ledger's migration."""
    engine = create_engine(resolve_url(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
            )
            connection.execute(
                text("INSERT INTO alembic_version VALUES (:revision)"),
                {"revision": SHOP_REVISION},
            )
            ShopBase.metadata.create_all(connection)
    finally:
        engine.dispose()
    upgrade(url)


@pytest.fixture(params=sorted(BROKERS))
def shop(request: pytest.FixtureRequest) -> Iterator[Shop]:
    """The shop on a new PostgreSQL database and a new broker of the kind the
    parameter names; Celery's current and default app are given back after."""
    name: str = request.param
    problem = stacks.missing_services(name)
    if problem:
        if REQUIRED:
            pytest.fail(f"stack {name}: {problem} (services are required here)")
        pytest.skip(f"stack {name}: {problem}")
    previous = get_current_app()
    with stacks.postgres_database() as database_url, BROKERS[name]() as broker_url:
        prepare_database(database_url)
        flask_app, celery_app, jobs = make_shop(database_url, broker_url)
        try:
            with jobs.session_scope() as session:
                token = auth.add_token(session, "shop-tests", auth.Role.OPERATOR)
            yield Shop(flask_app, celery_app, jobs, database_url, token)
            # An in-process worker made the shop's app current: nothing of it is left open.
            assert not jobs.session.registry.has(), "a task session was left open"
            assert proj.jobs.testing.checked_out(celery_app) == 0, "a connection is checked out"
        finally:
            # Let go of the database before it is dropped, and of the broker.
            jobs.dispose()
            with flask_app.app_context():
                db.engine.dispose()
            celery_app.close()
            previous.set_default()
            previous.set_current()


@pytest.fixture
def pay_deliveries(shop: Shop) -> Iterator[list[str]]:
    """The ids of the ``shop.pay`` messages a worker started to run."""
    seen: list[str] = []

    def record(sender: Any = None, task_id: str = "", **_: Any) -> None:
        if getattr(sender, "name", None) == "shop.pay":
            seen.append(task_id)

    signals.task_prerun.connect(record, weak=False)
    yield seen
    signals.task_prerun.disconnect(record)


def test_a_committed_view_s_job_runs(shop: Shop) -> None:
    """``POST /orders`` commits the order and its payment's job, whose message
    goes out with the commit: a worker runs it once, the order is paid, and
    the job API says ``succeeded``."""
    with shop.worker():
        order_id, job_id = shop.order()
        assert shop.jobs.flush()
        assert shop.job(job_id).published_at is not None  # by the commit, not the relay
        done = shop.wait_until_succeeded(job_id)
        answer = shop.client.get(f"/api/jobs/{job_id}")

    assert (done.state, done.attempts, done.name) == (State.SUCCEEDED, 1, "shop.pay")
    assert answer.status_code == 200
    assert answer.get_json()["state"] == "succeeded"
    status, paid_at = shop.orders()[order_id]
    assert status == "paid" and paid_at is not None
    assert shop.queued_messages() == 0


def test_the_shop_s_job_api_wants_a_token(shop: Shop) -> None:
    """The job API the shop mounts wants a token on every request: none is a
    401; a viewer's token reads, and its cancel is a 403 that leaves the job
    queued."""
    _, job_id = shop.order()
    with shop.jobs.session_scope() as session:
        viewer = {"Authorization": f"Bearer {auth.add_token(session, 'viewer', auth.Role.VIEWER)}"}
    anonymous = shop.flask_app.test_client()
    assert anonymous.get(f"/api/jobs/{job_id}").status_code == 401
    assert anonymous.get(f"/api/jobs/{job_id}", headers=viewer).status_code == 200
    assert anonymous.post(f"/api/jobs/{job_id}/cancel", headers=viewer).status_code == 403
    assert shop.job(job_id).state == State.QUEUED


def test_a_rolled_back_view_s_job_never_exists(shop: Shop, pay_deliveries: list[str]) -> None:
    """A view that enqueues and then fails (its transaction rolls back) leaves
    no order, no ledger row and no message; the next request's commit
    publishes its own job only, and the worker runs that one alone."""
    answer = shop.client.post("/orders", json={"fail": True})

    assert answer.status_code == 422
    assert answer.get_json()["error"]["code"] == "refused"
    assert shop.orders() == {}
    assert shop.job_ids() == []
    assert shop.queued_messages() == 0

    with shop.worker():
        order_id, job_id = shop.order()
        shop.wait_until_succeeded(job_id)
    assert shop.job_ids() == [job_id]
    assert shop.orders()[order_id][0] == "paid" and len(shop.orders()) == 1
    assert pay_deliveries == [job_id]
    assert shop.queued_messages() == 0


def test_tasks_run_in_the_flask_app_with_db_session_as_their_own(shop: Shop) -> None:
    """Inside ``pay``, ``current_app`` is the shop's Flask app (its config as
    it is now) and ``db.session`` is the run's own session, whose change to
    the order commits with the run."""
    shop.flask_app.config["SHOP_CURRENCY"] = currency = f"X{uuid.uuid4().hex[:2]}"
    with shop.worker():
        order_id, job_id = shop.order()
        done = shop.wait_until_succeeded(job_id)

    assert done.result == {"app": "shop", "currency": currency, "runs_own_session": True}
    assert shop.orders()[order_id][0] == "paid"


def test_the_relay_publishes_what_the_fast_path_did_not(shop: Shop) -> None:
    """With the fast path off, a committed job waits unpublished (no message)
    until a relay pass publishes it; then a worker runs it."""
    shop.jobs.settings = replace(shop.jobs.settings, outbox_fast_path=False)
    order_id, job_id = shop.order()

    waiting = shop.job(job_id)
    assert (waiting.state, waiting.published_at) == (State.QUEUED, None)
    assert shop.queued_messages() == 0

    relay = make_relay(shop.celery_app, replace(shop.jobs.settings, relay_grace=0.0))
    try:
        assert relay.relay_once() == 1
    finally:
        relay.engine.dispose()
    assert shop.job(job_id).published_at is not None
    assert shop.queued_messages() == 1

    with shop.worker():
        done = shop.wait_until_succeeded(job_id)
    assert (done.state, done.attempts) == (State.SUCCEEDED, 1)
    assert shop.orders()[order_id][0] == "paid"


def test_the_reconciler_sends_a_lost_message_again(shop: Shop) -> None:
    """A waiting job published long ago whose message the broker lost is
    handed back by ``proj.reconcile_jobs`` on the shop's app, published
    again by the relay, and runs once."""
    order_id, job_id = shop.order()
    assert shop.jobs.flush()
    assert shop.job(job_id).published_at is not None
    assert shop.queued_messages() == 1
    shop.celery_app.control.purge()  # the broker loses it
    past = utcnow() - LONG_AGO
    with shop.jobs.session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(created_at=past, available_at=past, published_at=past)
        )

    result = shop.celery_app.tasks["proj.reconcile_jobs"].apply().get()

    assert result == {"resent": 1, "abandoned": 0}
    assert shop.job(job_id).published_at is None
    relay = make_relay(shop.celery_app, replace(shop.jobs.settings, relay_grace=0.0))
    try:
        assert relay.relay_once() == 1
    finally:
        relay.engine.dispose()
    with shop.worker():
        done = shop.wait_until_succeeded(job_id)
    assert (done.state, done.attempts) == (State.SUCCEEDED, 1)
    assert shop.orders()[order_id][0] == "paid"
    assert shop.queued_messages() == 0


def test_two_beats_send_one_run_per_slot(
    shop: Shop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs made proj's slot scheduler and reconciler the shop's; two
    schedulers sending the shop's periodic entry at one instant make one job,
    one message and one run."""
    conf = shop.celery_app.conf
    assert conf.beat_scheduler == "proj.jobs.scheduler:SlotScheduler"
    assert conf.beat_schedule["proj-reconcile-jobs"]["task"] == "proj.reconcile_jobs"
    with shop.jobs.session_scope() as session:
        stale = Order(created_at=utcnow() - UNPAID_FOR - LONG_AGO)
        recent = Order()
        session.add_all([stale, recent])
        session.flush()
        stale_id, recent_id = stale.id, recent.id
    instant = utcnow()
    monkeypatch.setattr(shop.celery_app, "now", lambda: instant)
    beats = [
        SlotScheduler(app=shop.celery_app, schedule_filename=str(tmp_path / f"beat{n}"), lazy=True)
        for n in (1, 2)
    ]
    entries = [
        ScheduleEntry(
            name="expire-unpaid", app=shop.celery_app, **conf.beat_schedule["expire-unpaid"]
        )
        for _ in beats
    ]

    sent = [
        beat.apply_async(entry, advance=False) for beat, entry in zip(beats, entries, strict=True)
    ]

    assert sent[0] is not None and sent[1] is None
    job_id = sent[0].id
    assert shop.job_ids("shop.expire_unpaid") == [job_id]
    assert shop.jobs.flush()
    assert shop.queued_messages() == 1
    with shop.worker():
        done = shop.wait_until_succeeded(job_id)
    assert (done.state, done.attempts, done.result) == (State.SUCCEEDED, 1, 1)
    orders = shop.orders()
    assert (orders[stale_id][0], orders[recent_id][0]) == ("expired", "pending")
    assert shop.queued_messages() == 0


def test_the_shop_s_database_gets_the_ledger_and_nothing_else(shop: Shop) -> None:
    """The ledger's migration adds the ledger's tables (``jobs``…) and its own
    version table, leaves the shop's ``alembic_version`` row alone (run twice
    too), and creates none of the reference application's tables."""
    upgrade(shop.database_url)  # a second time changes nothing
    engine = create_engine(resolve_url(shop.database_url), poolclass=pool.NullPool)
    try:
        tables = set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            shop_revisions = list(
                connection.scalars(text("SELECT version_num FROM alembic_version"))
            )
            ledger_revisions = connection.scalar(text(f"SELECT count(*) FROM {VERSION_TABLE}"))
            ledger_rows = connection.scalar(select(func.count()).select_from(Job))
    finally:
        engine.dispose()

    ledger_tables = set(Job.metadata.tables)  # the ledger's own metadata: jobs, …
    assert {"jobs", auth.ApiToken.__tablename__} <= ledger_tables
    assert tables == {"orders", "alembic_version", VERSION_TABLE, *ledger_tables}
    assert not tables & REFERENCE_TABLES
    assert shop_revisions == [SHOP_REVISION]
    assert (ledger_revisions, ledger_rows) == (1, 0)


IMPORT_CHECK = """
import json, sys, threading
import celery._state

def reference_modules():
    return sorted(
        name for name in sys.modules
        if name.startswith("proj.") and not name.startswith("proj.jobs")
    )

current = celery._state.get_current_app()
threads = threading.active_count()
report = {}
import proj.jobs
import proj.jobs.api, proj.jobs.migrations, proj.jobs.relay, proj.jobs.scheduler
report["library"] = {
    "same_current_app": celery._state.get_current_app() is current,
    "new_threads": threading.active_count() - threads,
    "reference_modules": reference_modules(),
}
from adopter.shop import make_shop
flask_app, celery_app, jobs = make_shop(
    "postgresql+psycopg2://nobody@127.0.0.1:1/nothing", "memory://"
)
report["shop"] = {
    "same_current_app": celery._state.get_current_app() is current,
    "new_threads": threading.active_count() - threads,
    "reference_modules": reference_modules(),
}
print(json.dumps(report))
"""


def test_importing_proj_jobs_starts_nothing() -> None:
    """In a fresh interpreter, ``import proj.jobs`` (and the shop made on it:
    ``Jobs(...)``, ``init_app``) leaves Celery's current app as it was,
    starts no thread and imports nothing of the reference application
    (``proj.celery``, ``proj.tasks``, ``proj.web``, ``proj.db``…)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    nothing = {"same_current_app": True, "new_threads": 0, "reference_modules": []}
    assert report == {"library": nothing, "shop": nothing}
