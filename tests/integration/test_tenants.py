"""Tenants: a tenant sees and changes its own rows only.

On PostgreSQL the database keeps them apart (row-level security, migration
0003), so these tests connect as a role it applies to, as a deployment
does: a role with NOSUPERUSER NOBYPASSRLS that may read and write the rows
of tables another role made and owns. The application's own look-ups keep
them apart on every stack (the last tests).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pytest
import stacks
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, orm, pool, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

import proj.jobs.testing
from proj.celery import make_celery
from proj.cli import tenant_isolation_problems
from proj.config import Settings, load_settings, use_settings
from proj.db import Session, db, session_scope
from proj.jobs import TENANT_LEDGER_TABLES, Jobs, auth, context, publisher, shared_task
from proj.jobs.engine import resolve_url
from proj.jobs.ledger import MESSAGE_FIELDS
from proj.jobs.relay import make_relay
from proj.migrations import upgrade
from proj.models import TENANT_TABLES, Invoice, User
from proj.payments import LedgerCharge
from proj.tasks import charge_invoice, generate_report, send_welcome
from proj.web import create_app

if TYPE_CHECKING:
    from conftest import Stack


@shared_task(name="tests.tenants.welcome_by_id")
def welcome_by_id(user_id: int) -> dict[str, Any]:
    """Whether the run sees the user, and how many rows it changed setting
    ``welcomed_at``: no check of its own, only the database's stands in the way."""
    seen = Session.get(User, user_id) is not None
    changed = Session.execute(
        text("UPDATE users SET welcomed_at = now() WHERE id = :id"), {"id": user_id}
    )
    return {"seen": seen, "changed": changed.rowcount}  # type: ignore[attr-defined]


@shared_task(name="tests.tenants.visible_rows")
def visible_rows() -> dict[str, int]:
    """The rows of each tenant table the run sees, by ``table:tenant``."""
    counts = {}
    for table in TENANT_TABLES:
        query = text(f"SELECT coalesce(tenant, ''), count(*) FROM {table} GROUP BY 1")
        for tenant, count in Session.execute(query):
            counts[f"{table}:{tenant}"] = count
    return counts


@dataclass
class Tenanted:
    """proj on a database where row-level security applies to its role."""

    settings: Settings
    celery_app: Celery
    flask_app: Flask
    admin: Engine
    """A superuser on the same database: sees every row, whatever the tenant."""
    owner: str
    """The role that ran the migrations and owns the tables."""

    @property
    def jobs(self) -> Jobs:
        return Jobs.of(self.celery_app)

    def token(self, tenant: str | None) -> str:
        with self.jobs.session_scope() as session:
            return auth.add_token(session, f"t-{uuid.uuid4().hex[:12]}", "operator", tenant=tenant)

    def client(self, tenant: str | None) -> FlaskClient:
        """A test client sending an operator's token for ``tenant``."""
        made = self.flask_app.test_client()
        made.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {self.token(tenant)}"
        return made

    def row(self, table: str, ident: int) -> dict[str, Any]:
        """A row as it is, seen by the superuser."""
        query = text(f"SELECT * FROM {table} WHERE id = :id")
        with self.admin.connect() as connection:
            return dict(connection.execute(query, {"id": ident}).mappings().one())

    def result(self, job_id: str) -> Any:
        """A job's result once it succeeded."""
        row = proj.jobs.testing.wait_for_state(job_id, "succeeded", celery_app=self.celery_app)
        return row.result


@pytest.fixture(scope="module")
def role_stack(stack: Stack) -> Iterator[Tenanted]:
    """proj on the stack's broker and a migrated database of the role's."""
    if not stack.on_postgres:
        pytest.skip("row-level security is PostgreSQL's")
    with stacks.role_database() as (url, owner_url):
        env = {
            **stack.env,
            "DATABASE_URL": url,
            "CELERY_RESULT_BACKEND": f"db+{url}",
            "PROJ_RELAY_IN_WORKER": "0",
        }
        settings = load_settings(env)
        upgrade(owner_url)
        own = make_celery(settings)
        superuser = make_url(resolve_url(url)).set(username=stacks.POSTGRES[2])
        admin = create_engine(superuser, poolclass=pool.NullPool)
        flask_app = create_app(settings, own)
        flask_app.testing = True
        try:
            yield Tenanted(settings, own, flask_app, admin, str(make_url(owner_url).username))
        finally:
            Jobs.of(own).dispose()
            with flask_app.app_context():
                db.engine.dispose()
            admin.dispose()
            own.close()


@pytest.fixture
def tenanted(role_stack: Tenanted, stack: Stack, celery_app: Celery) -> Iterator[Tenanted]:
    """:func:`role_stack`'s app current and default, and its settings in
    effect, for the test (the stack's given back after)."""
    use_settings(role_stack.settings)
    role_stack.celery_app.set_current()
    role_stack.celery_app.set_default()
    try:
        yield role_stack
    finally:
        use_settings(stack.settings)
        celery_app.set_current()
        celery_app.set_default()


@pytest.fixture
def purged_tenanted(tenanted: Tenanted) -> Tenanted:
    tenanted.celery_app.control.purge()
    return tenanted


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Rows:
    user: int
    invoice: int
    charge: str


def make_rows(tenant: str | None) -> Rows:
    """A user, an invoice and a gateway charge of ``tenant``, made in a
    transaction of that tenant."""
    with context.tenant(tenant), session_scope() as session:
        user = User(email=f"{uuid.uuid4().hex[:12]}@example.com")
        session.add(user)
        session.flush()
        invoice = Invoice(user_id=user.id, amount_cents=100)
        charge = LedgerCharge(
            idempotency_key=f"tenants-{uuid.uuid4().hex}",
            charge_id=f"ch_{uuid.uuid4().hex[:24]}",
            amount_cents=100,
        )
        session.add_all([invoice, charge])
        session.flush()
        return Rows(user.id, invoice.id, charge.idempotency_key)


def test_rows_belong_to_the_tenant_they_were_made_for(tenanted: Tenanted) -> None:
    """Made with a tenant current, a row is that tenant's; with none, nobody's;
    a row for another tenant than the transaction's is refused."""
    tenant = new_tenant()
    mine, nobodys = make_rows(tenant), make_rows(None)
    assert tenanted.row("users", mine.user)["tenant"] == tenant
    assert tenanted.row("invoices", mine.invoice)["tenant"] == tenant
    assert tenanted.row("users", nobodys.user)["tenant"] is None
    with tenanted.admin.connect() as connection:
        query = text("SELECT tenant FROM gateway_charges WHERE idempotency_key = :key")
        assert connection.scalar(query, {"key": mine.charge}) == tenant
    refused = pytest.raises(ProgrammingError, match="row-level security")
    with context.tenant(tenant), refused, session_scope() as session:
        session.add(User(email=f"{uuid.uuid4().hex[:12]}@example.com", tenant=new_tenant()))


def test_a_run_for_one_tenant_neither_reads_nor_changes_another_tenants_rows(
    purged_tenanted: Tenanted,
) -> None:
    """Given tenant B's ids, a run for tenant A finds nothing, and B's rows
    stay as they were; the same run finds A's own."""
    tenanted = purged_tenanted
    a, b = new_tenant(), new_tenant()
    theirs, ours = make_rows(b), make_rows(a)
    with proj.jobs.testing.worker(tenanted.celery_app, pool="threads", concurrency=2):
        with context.tenant(a):
            raw_theirs = welcome_by_id.delay_on_commit(theirs.user)
            raw_ours = welcome_by_id.delay_on_commit(ours.user)
            welcome = send_welcome.delay_on_commit(theirs.user)
            charge = charge_invoice.delay_on_commit(theirs.invoice)
            report = generate_report.delay_on_commit(theirs.user)
        assert tenanted.result(raw_theirs) == {"seen": False, "changed": 0}
        assert tenanted.result(raw_ours) == {"seen": True, "changed": 1}
        assert tenanted.result(welcome) is None
        assert tenanted.result(charge) is None
        assert tenanted.result(report) is None
    for job_id in (raw_theirs, raw_ours, welcome, charge, report):
        assert proj.jobs.testing.job(job_id).tenant == a
    assert tenanted.row("users", theirs.user)["welcomed_at"] is None
    assert tenanted.row("invoices", theirs.invoice)["status"] == "open"
    assert tenanted.row("invoices", theirs.invoice)["charge_id"] is None
    assert tenanted.row("users", ours.user)["welcomed_at"] is not None


def test_a_run_with_no_tenant_sees_no_tenant_scoped_rows(purged_tenanted: Tenanted) -> None:
    """A run with no tenant sees only the rows that have none: not one row of
    any tenant, in any tenant table."""
    tenanted = purged_tenanted
    theirs = make_rows(new_tenant())
    make_rows(None)
    with tenanted.admin.connect() as connection:
        untenanted = {
            f"{table}:": connection.scalar(
                text(f"SELECT count(*) FROM {table} WHERE tenant IS NULL")
            )
            for table in TENANT_TABLES
        }
    with proj.jobs.testing.worker(tenanted.celery_app, pool="threads", concurrency=2):
        counted = visible_rows.delay_on_commit()
        touched = welcome_by_id.delay_on_commit(theirs.user)
        assert tenanted.result(counted) == untenanted
        assert tenanted.result(touched) == {"seen": False, "changed": 0}
    assert proj.jobs.testing.job(counted).tenant is None
    assert tenanted.row("users", theirs.user)["welcomed_at"] is None


def test_a_tenants_token_sees_and_makes_that_tenants_rows_only(
    purged_tenanted: Tenanted,
) -> None:
    """With tenant A's token, tenant B's user, invoice and job are 404s (or
    400s where named in a body), what A makes is A's, and an email signs up
    once per tenant."""
    tenanted = purged_tenanted
    a, b = new_tenant(), new_tenant()
    as_a, as_b = tenanted.client(a), tenanted.client(b)
    address = f"{uuid.uuid4().hex[:12]}@example.com"
    with proj.jobs.testing.worker(tenanted.celery_app, pool="threads", concurrency=2):
        theirs = as_b.post("/api/users", json={"email": address}).get_json()["id"]
        invoice = as_b.post("/api/invoices", json={"user_id": theirs, "amount_cents": 5})
        their_invoice = invoice.get_json()["id"]
        their_job = as_b.post("/api/reports", json={"user_id": theirs}).get_json()["job_id"]
        assert tenanted.result(their_job)["user_id"] == theirs

        assert as_a.get(f"/api/users/{theirs}").status_code == 404
        assert as_a.get(f"/api/invoices/{their_invoice}").status_code == 404
        assert as_a.post(f"/api/invoices/{their_invoice}/charge").status_code == 404
        body = {"user_id": theirs, "amount_cents": 5}
        assert as_a.post("/api/invoices", json=body).status_code == 400
        assert as_a.post("/api/reports", json={"user_id": theirs}).status_code == 400
        assert as_a.get(f"/api/jobs/{their_job}").status_code == 404
        untenanted = tenanted.client(None)
        assert untenanted.get(f"/api/jobs/{their_job}").status_code == 404
        listed = untenanted.get("/api/jobs?limit=100").get_json()["jobs"]
        assert their_job not in {job["id"] for job in listed}

        created = as_a.post("/api/users", json={"email": address})
        assert created.status_code == 201, created.get_data(as_text=True)
        ours = created.get_json()["id"]
        assert as_a.post("/api/users", json={"email": address}).status_code == 409
        invoice = as_a.post("/api/invoices", json={"user_id": ours, "amount_cents": 7})
        assert invoice.status_code == 201
        charged = as_a.post(f"/api/invoices/{invoice.get_json()['id']}/charge").get_json()
        assert tenanted.result(charged["job_id"]) is not None
        proj.jobs.testing.wait_for(lambda: tenanted.row("users", ours)["welcomed_at"])
    assert tenanted.row("users", ours)["tenant"] == a
    assert tenanted.row("invoices", invoice.get_json()["id"])["tenant"] == a
    assert tenanted.row("invoices", invoice.get_json()["id"])["status"] == "charged"
    assert tenanted.row("users", theirs)["tenant"] == b
    assert tenanted.row("invoices", their_invoice)["status"] == "open"
    # The request's own transactions carry its tenant (not only the look-ups above).
    with tenanted.flask_app.test_request_context(), context.tenant(a):
        query = text("SELECT count(*) FROM users WHERE id IN (:ours, :theirs)")
        assert db.session.scalar(query, {"ours": ours, "theirs": theirs}) == 1
        db.session.remove()


def test_jobs_the_relay_publishes_run_for_the_tenant_in_their_row(
    purged_tenanted: Tenanted,
) -> None:
    """A job left to the relay runs for the tenant it was enqueued for, even
    when the relay's own process has another one current."""
    tenanted = purged_tenanted
    a, b = new_tenant(), new_tenant()
    theirs, ours = make_rows(b), make_rows(a)
    settings = tenanted.jobs.settings
    tenanted.jobs.settings = replace(settings, outbox_fast_path=False)
    try:
        as_a = tenanted.client(a)
        signed_up = as_a.post("/api/users", json={"email": f"{uuid.uuid4().hex}@example.com"})
        with context.tenant(a):
            raw_theirs = welcome_by_id.delay_on_commit(theirs.user)
            raw_ours = welcome_by_id.delay_on_commit(ours.user)
        untenanted = welcome_by_id.delay_on_commit(theirs.user)
    finally:
        tenanted.jobs.settings = settings
    relay = make_relay(tenanted.celery_app, replace(settings, relay_grace=0.0))
    try:
        with context.tenant(b):
            assert relay.relay_once() == 4
    finally:
        relay.engine.dispose()
    with proj.jobs.testing.worker(tenanted.celery_app, pool="threads", concurrency=2):
        assert tenanted.result(raw_theirs) == {"seen": False, "changed": 0}
        assert tenanted.result(untenanted) == {"seen": False, "changed": 0}
        assert tenanted.result(raw_ours) == {"seen": True, "changed": 1}
        welcomed = signed_up.get_json()["id"]
        proj.jobs.testing.wait_for(lambda: tenanted.row("users", welcomed)["welcomed_at"])
    assert tenanted.row("users", theirs.user)["welcomed_at"] is None


def test_a_claimed_job_runs_for_the_tenant_in_its_row_whatever_its_message_says(
    purged_tenanted: Tenanted,
) -> None:
    """Tenant A's job, published (by hand, as a forger with access to the
    broker could) with tenant B's context in its header: the run restores the
    context its row keeps, so it cannot see nor change B's rows."""
    tenanted = purged_tenanted
    a, b = new_tenant(), new_tenant()
    theirs = make_rows(b)
    settings = tenanted.jobs.settings
    tenanted.jobs.settings = replace(settings, outbox_fast_path=False)
    try:
        with context.tenant(a):
            job_id = welcome_by_id.delay_on_commit(theirs.user)
    finally:
        tenanted.jobs.settings = settings
    with context.tenant(b):
        forged = context.capture()
    row = proj.jobs.testing.job(job_id)
    assert row.context and row.context.get("tenant") == a
    message = {
        **publisher.job_message({column: getattr(row, column) for column in MESSAGE_FIELDS}),
        "context": forged,
    }
    with tenanted.celery_app.producer_or_acquire() as producer:
        publisher.send(tenanted.celery_app, message, producer)
    with proj.jobs.testing.worker(tenanted.celery_app, pool="threads", concurrency=2):
        assert tenanted.result(job_id) == {"seen": False, "changed": 0}
    assert tenanted.row("users", theirs.user)["welcomed_at"] is None


def test_a_pooled_connection_reused_without_a_tenant_sees_nothing_of_the_last_one(
    tenanted: Tenanted,
) -> None:
    """Tenant A's transactions on a connection (committed, rolled back) leave
    nothing behind: the next transaction on it, with no tenant, in a session
    or not, sees none of A's rows."""
    tenant = new_tenant()
    ours = make_rows(tenant)
    engine = create_engine(tenanted.settings.database_url, pool_size=1, max_overflow=0)
    pid = text("SELECT pg_backend_pid()")
    setting = text("SELECT current_setting('proj.tenant', true)")
    mine = select(User.id).where(User.id == ours.user)
    try:
        with context.tenant(tenant):
            with orm.Session(engine) as session, session.begin():
                first = session.scalar(pid)
                assert session.scalar(setting) == tenant
                assert session.scalar(mine) == ours.user
            with orm.Session(engine) as session:
                assert session.scalar(mine) == ours.user
                session.rollback()
        with orm.Session(engine) as session, session.begin():
            assert session.scalar(pid) == first
            assert session.scalar(setting) in (None, "")
            assert session.scalar(mine) is None
        with engine.connect() as connection:
            assert connection.scalar(pid) == first
            assert connection.scalar(mine) is None
    finally:
        engine.dispose()


def test_proj_check_names_a_role_that_bypasses_row_level_security(tenanted: Tenanted) -> None:
    """Once tenants are in use, ``proj check`` names a superuser, and the
    owner of the tenant tables (an owner may switch their row-level security
    off, forced or not); the application's role, which owns nothing, passes."""
    tenanted.token(new_tenant())
    with tenanted.jobs.engine.connect() as connection:
        assert tenant_isolation_problems(connection) == []
    with tenanted.admin.connect() as connection:
        [problem] = tenant_isolation_problems(connection)
        assert "superuser" in problem
    owner = create_engine(
        make_url(tenanted.admin.url).set(username=tenanted.owner), poolclass=pool.NullPool
    )
    try:
        with owner.connect() as connection:
            problems = tenant_isolation_problems(connection)
    finally:
        owner.dispose()
    assert len(problems) == len(TENANT_TABLES) + len(TENANT_LEDGER_TABLES)
    assert all(f"{tenanted.owner} owns" in problem for problem in problems), problems


def test_proj_check_says_nothing_where_tenants_are_not_used(stack: Stack) -> None:
    """A superuser is no problem while no token and no job has a tenant."""
    if not stack.on_postgres:
        pytest.skip("row-level security is PostgreSQL's")
    with stacks.postgres_database() as url:
        upgrade(url)
        engine = create_engine(resolve_url(url), poolclass=pool.NullPool)
        try:
            with engine.connect() as connection:
                assert tenant_isolation_problems(connection) == []
        finally:
            engine.dispose()


def tenant_client(app: Flask, tenant: str | None) -> FlaskClient:
    """A test client of ``app`` sending an operator's token for ``tenant``."""
    with app.app_context():
        token = auth.add_token(db.session, f"t-{uuid.uuid4().hex[:12]}", "operator", tenant=tenant)
        db.session.commit()
    made = app.test_client()
    made.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return made


def test_the_application_keeps_tenants_apart_on_every_stack(
    stack: Stack, purged: Celery, app: Flask
) -> None:
    """Where nothing in the database does (SQLite; a role that bypasses
    row-level security, as the stacks' superuser does), the API's look-ups
    and the tasks' keep tenants apart: another tenant's user and invoice are
    404s, and a run for tenant A given B's user leaves it as it was."""
    a, b = new_tenant(), new_tenant()
    as_a, as_b, as_nobody = tenant_client(app, a), tenant_client(app, b), tenant_client(app, None)
    made = make_rows(b)
    theirs, their_invoice = made.user, made.invoice
    for client in (as_a, as_nobody):
        assert client.get(f"/api/users/{theirs}").status_code == 404
        assert client.get(f"/api/invoices/{their_invoice}").status_code == 404
        assert client.post(f"/api/invoices/{their_invoice}/charge").status_code == 404
        body = {"user_id": theirs, "amount_cents": 5}
        assert client.post("/api/invoices", json=body).status_code == 400
        assert client.post("/api/reports", json={"user_id": theirs}).status_code == 400
    assert as_b.get(f"/api/users/{theirs}").status_code == 200
    assert as_b.get(f"/api/invoices/{their_invoice}").status_code == 200
    address = f"{uuid.uuid4().hex[:12]}@example.com"
    assert as_b.post("/api/users", json={"email": address}).status_code == 201
    assert as_b.post("/api/users", json={"email": address}).status_code == 409
    assert as_a.post("/api/users", json={"email": address}).status_code == 201
    assert as_nobody.post("/api/users", json={"email": address}).status_code == 201
    assert as_nobody.post("/api/users", json={"email": address}).status_code == 409
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        with context.tenant(a):
            welcome = send_welcome.delay_on_commit(theirs)
            charge = charge_invoice.delay_on_commit(their_invoice)
        for job_id in (welcome, charge):
            assert proj.jobs.testing.wait_for_state(job_id, "succeeded").result is None
    with session_scope() as session:
        user, their_invoice_row = session.get(User, theirs), session.get(Invoice, their_invoice)
        assert user is not None and their_invoice_row is not None
        assert (user.tenant, user.welcomed_at) == (b, None)
        assert (their_invoice_row.tenant, their_invoice_row.status) == (b, "open")
