"""``celery -A proj worker`` on the prefork pool (and ``celery -A proj beat``),
as subprocesses on each stack: forked children, kill -9, periodic tasks.

One worker runs for the whole module on a stack; its log is checked per test
from the offset where the test began.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import e2e_tasks
import psutil
import psycopg2
import pytest
from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from subprocesses import Command, Commands

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import utcnow
from proj.jobs.models import Job, State
from proj.jobs.testing import wait_for
from proj.models import Invoice, User
from proj.payments import LedgerCharge
from proj.tasks import charge_invoice, pool_status, send_welcome

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

PAYMENT_LATENCY = 3.0
"""Seconds the gateway takes before it records a charge (the worker's setting)."""
PAUSE_AFTER_CHARGE = 3.0
"""Seconds the worker's gateway pauses after recording a charge (e2e_tasks)."""
TROUBLE = re.compile(
    r"ssl|protocol|server closed the connection|another process|connection already closed"
    r"|InterfaceError|OperationalError|Traceback|ERROR/|CRITICAL/",
    re.IGNORECASE,
)
"""What a worker log shows when connections are shared (or anything else fails)."""


@pytest.fixture(scope="module")
def worker(stack: Stack, celery_app: Celery, tmp_path_factory: Any) -> Iterator[Command]:
    """One prefork worker (two children) on the stack, for the module."""
    celery_app.control.purge()
    running = Commands(tmp_path_factory.mktemp("worker"))
    env = stack.process_env(
        PROJ_PAYMENT_LATENCY=str(PAYMENT_LATENCY),
        E2E_PAUSE_AFTER_CHARGE=str(PAUSE_AFTER_CHARGE),
        E2E_CONNECT_BEFORE_FORK="1",
    )
    try:
        yield running.worker(env)
    finally:
        running.stop_all()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def new_users(emails: list[str]) -> list[int]:
    with session_scope() as session:
        users = [User(email=address) for address in emails]
        session.add_all(users)
        session.flush()
        return [user.id for user in users]


def child_pids(worker: Command) -> set[int]:
    return {child.pid for child in psutil.Process(worker.pid).children()}


def pg_activity(stack: Stack) -> list[dict[str, Any]]:
    """The stack database's rows of ``pg_stat_activity``, read over a connection
    of the test's own."""
    database = make_url(stack.env["DATABASE_URL"]).database
    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid, application_name, state, client_port, backend_start, state_change "
                "FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        connection.close()


def worker_connections(stack: Stack) -> dict[int, list[dict[str, Any]]]:
    """The worker tier's connections by the pid that opened them (their
    ``application_name``), leaving out this test process's own."""
    held: dict[int, list[dict[str, Any]]] = {}
    for row in pg_activity(stack):
        role, _, pid = row["application_name"].partition(":")
        if role == "proj-worker" and int(pid) != os.getpid():
            held.setdefault(int(pid), []).append(row)
    return held


def postgres_ports(process: psutil.Process) -> set[int]:
    """Local ports of ``process``'s TCP connections to PostgreSQL."""
    return {
        conn.laddr.port
        for conn in process.net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == 5432
    }


def test_children_use_their_own_connections(
    stack: Stack, celery_app: Celery, worker: Command
) -> None:
    """300 session tasks on two forked children: every effect lands, the log
    shows no connection trouble, and on PostgreSQL each child holds connections
    of its own (named ``proj-worker:<pid>``), none shared with another process,
    none left idle in a transaction."""
    since = worker.size()
    # e2e_tasks made the main process open a connection before it forked.
    parent_held = worker_connections(stack).get(worker.pid, []) if stack.on_postgres else []
    assert len(parent_held) == (1 if stack.on_postgres else 0)
    run = tag()
    emails = [f"welcome-{i}-{run}@e2e.test" for i in range(100)]
    user_ids = new_users(emails)
    sent: list[tuple[AsyncResult[Any], Any]] = []
    for i, (user_id, address) in enumerate(zip(user_ids, emails, strict=True)):
        send_welcome.delay(user_id)  # stores no result: its effect is checked below
        created = f"created-{i}-{run}@e2e.test"
        sent.append((e2e_tasks.create_user.delay(created), int))
        sent.append((e2e_tasks.read_email.delay(user_id), address))

    for result, expected in sent:
        value = result.get(timeout=180)
        assert value == expected or (expected is int and isinstance(value, int)), result.name

    def welcomed() -> int:
        with session_scope() as session:
            return int(
                session.scalar(
                    select(func.count(User.id)).where(
                        User.id.in_(user_ids), User.welcomed_at.is_not(None)
                    )
                )
                or 0
            )

    wait_for(lambda: welcomed() == 100, timeout=180)
    with session_scope() as session:
        created = session.scalar(
            select(func.count(User.id)).where(User.email.like(f"created-%-{run}@e2e.test"))
        )
    assert (welcomed(), created) == (100, 100)
    mails = [p.read_text() for p in (stack.data_dir / "mail").glob("*.eml")]
    assert sum(f"-{run}@e2e.test" in mail for mail in mails) == 100
    assert not TROUBLE.findall(worker.output(since))

    if not stack.on_postgres:
        return
    children = child_pids(worker)
    assert len(children) == 2

    def idle_in_transaction() -> list[dict[str, Any]]:
        return [row for row in pg_activity(stack) if row["state"] == "idle in transaction"]

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not idle_in_transaction())
    assert idle_in_transaction() == []
    held = worker_connections(stack)
    assert set(held) == {worker.pid, *children}, "the children hold connections of their own"
    assert held[worker.pid] == parent_held, "the main process's connection was left alone"
    family = [psutil.Process(worker.pid), *(psutil.Process(pid) for pid in children)]
    ports = {process.pid: postgres_ports(process) for process in family}
    for child in children:
        for row in held[child]:
            holders = [pid for pid, open_ports in ports.items() if row["client_port"] in open_ports]
            assert holders == [child], f"{row} is open in {holders}"


def test_pool_is_back_after_every_outcome(
    stack: Stack, celery_app: Celery, worker: Command
) -> None:
    """Tasks that succeed, fail, retry, are ignored or reject their message
    each roll back or commit, and leave no connection checked out in either
    child (``proj.tasks.pool_status`` asks each child's own pool); each final
    failure is recorded."""
    since = worker.size()
    run = tag()
    kinds = ["succeed", "fail", "retry", "ignore", "reject"]
    sent = {
        (kind, f"{kind}-{i}-{run}@e2e.test"): e2e_tasks.outcome.delay(
            kind, f"{kind}-{i}-{run}@e2e.test"
        )
        for i in range(6)
        for kind in kinds
    }
    for (kind, _), result in sent.items():
        if kind != "ignore":
            result.get(timeout=120, propagate=False)
            assert result.state == ("SUCCESS" if kind == "succeed" else "FAILURE"), kind

    children = child_pids(worker)
    answers: list[dict[str, Any]] = []
    for _ in range(50):
        batch = [pool_status.delay() for _ in range(4)]
        answers += [result.get(timeout=60) for result in batch]
        if children <= {answer["pid"] for answer in answers}:
            break
    assert children <= {answer["pid"] for answer in answers}
    assert [a for a in answers if a["checked_out"] != 0] == []
    assert all(answer["checked_in"] > 0 for answer in answers), "the pool was never used"

    ignored = [result.id for (kind, _), result in sent.items() if kind == "ignore"]
    worker.until(lambda: all(f"[{task_id}] ignored" in worker.output(since) for task_id in ignored))
    with session_scope() as session:
        kept = session.scalars(select(User.email).where(User.email.like(f"%-{run}@e2e.test")))
        assert sorted(kept) == sorted(email for kind, email in sent if kind == "succeed")
        failed = {
            job.id: (job.state, job.attempts)
            for job in session.scalars(select(Job).where(Job.id.in_(r.id for r in sent.values())))
        }
    # A final failure (a rejected message included) ends as a failed ledger row.
    expected = {"fail": (State.FAILED, 1), "retry": (State.FAILED, 2), "reject": (State.FAILED, 1)}
    for (kind, _), result in sent.items():
        assert failed.get(result.id) == expected.get(kind), kind


def ledger_charges(key: str) -> list[str]:
    with session_scope() as session:
        query = select(LedgerCharge.charge_id).filter_by(idempotency_key=key)
        return list(session.scalars(query))


def running_pid(celery_app: Celery, job_id: str, ledger: bool) -> int | None:
    """The pid of the process running the task: from the job's ledger row, or
    for a plain ``delay()`` from Celery's STARTED state (``charge_invoice`` has
    ``track_started``)."""
    if not ledger:
        meta = celery_app.backend.get_task_meta(job_id)
        return meta["result"].get("pid") if meta["status"] == "STARTED" else None
    job = proj.jobs.testing.job(job_id)
    if job.state != State.RUNNING or not job.worker:
        return None
    return int(job.worker.rpartition(":")[2])


def charged_invoice(invoice_id: int) -> str | None:
    """The invoice's charge id once it is charged."""
    with session_scope() as session:
        invoice = session.get(Invoice, invoice_id)
        return invoice.charge_id if invoice is not None and invoice.status == "charged" else None


@pytest.mark.parametrize(
    ("window", "enqueue"),
    [
        ("before-gateway", "delay"),
        ("before-gateway", "delay_on_commit"),
        ("after-gateway", "delay_on_commit"),
    ],
)
def test_killed_child_task_runs_again_and_charges_once(
    stack: Stack, celery_app: Celery, worker: Command, window: str, enqueue: str
) -> None:
    """kill -9 of the child running ``charge_invoice``, before the gateway
    records the charge or after it but before the invoice commits: the message
    is redelivered, the task runs again, and the invoice is charged once, with
    one charge at the gateway. Sent with ``delay_on_commit``, the job's ledger
    row counts both attempts and ends ``succeeded``."""
    since = worker.size()
    [user_id] = new_users([f"payer-{tag()}@e2e.test"])
    with session_scope() as session:
        invoice = Invoice(user_id=user_id, amount_cents=1234)
        session.add(invoice)
        session.flush()
        invoice_id, key = invoice.id, invoice.idempotency_key
        if enqueue == "delay_on_commit":
            job_id = charge_invoice.apply_async_on_commit((invoice_id,), session=session)
    if enqueue == "delay":
        job_id = charge_invoice.delay(invoice_id).id
    ledger = enqueue == "delay_on_commit"
    pid = worker.until(lambda: running_pid(celery_app, job_id, ledger), timeout=60)
    assert pid in child_pids(worker)
    if window == "after-gateway":
        worker.until(lambda: ledger_charges(key))
    else:
        assert ledger_charges(key) == []
    os.kill(pid, signal.SIGKILL)

    charge_id = worker.until(lambda: charged_invoice(invoice_id), timeout=120)
    if not ledger:
        assert charge_invoice.AsyncResult(job_id).get(timeout=60) == charge_id
    else:
        worker.until(lambda: proj.jobs.testing.job(job_id).state == State.SUCCEEDED)
        assert proj.jobs.testing.job(job_id).attempts == 2
    assert ledger_charges(key) == [charge_id]
    log = worker.output(since)
    assert f"pid:{pid} exited with 'signal 9 (SIGKILL)'" in log
    assert log.count(f"charge_invoice[{job_id}] received") == 2


def test_beat_sends_cleanup_on_schedule(
    stack: Stack, celery_app: Celery, worker: Command, commands: Commands
) -> None:
    """``celery -A proj beat`` (making its data folder if need be) sends
    ``cleanup_expired`` every ``PROJ_CLEANUP_INTERVAL`` seconds; the worker runs
    it each time and deletes the finished jobs older than the retention period,
    and only those."""
    since = worker.size()
    retention = timedelta(days=stack.settings.jobs.retention_days)
    run = tag()
    with session_scope() as session:
        session.add_all(
            Job(
                id=f"e2e-{age}-{run}",
                name="e2e.cleanup",
                state=State.FAILED,
                error=f"e2e: {age}",
                created_at=utcnow() - retention + timedelta(days=shift, minutes=-1),
                finished_at=utcnow() - retention + timedelta(days=shift),
            )
            for age, shift in (("expired", -1), ("kept", 1))
        )
    env = stack.process_env(PROJ_CLEANUP_INTERVAL="1")
    if stack.on_postgres:
        # The data folder only holds beat's schedule here: start with none.
        env["PROJ_DATA_DIR"] = str(commands.folder / "new-data")
    beat = commands.celery("beat", "beat", "--loglevel=INFO", env=env)
    ran = re.compile(r"Task proj\.tasks\.cleanup_expired\[[^\]]+\] succeeded")
    worker.wait_for_output(ran, count=2, since=since, timeout=30)
    assert "Sending due task cleanup-expired (proj.tasks.cleanup_expired)" in beat.output()
    assert beat.stop() == 0
    with session_scope() as session:
        left = session.scalars(select(Job.id).where(Job.id.like(f"e2e-%-{run}")))
        assert list(left) == [f"e2e-kept-{run}"]
