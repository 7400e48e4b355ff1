"""The database roles deploy/postgres/init/10-proj-roles.sh makes, on a real
PostgreSQL: the script run as the postgres image runs it (psql, as a
superuser, on a new database), then what docker-compose.yml and the
Kubernetes manifests do with them: ``proj db upgrade`` as the owner, ``proj
check`` as each role, and a sign-up through to its welcome mail as the
application's role (the web application and a real worker).

The roles are named for the run (the script's ``PROJ_OWNER_ROLE`` and
``PROJ_APP_ROLE``) and dropped with the database afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg2
import pytest
import stacks
from celery import Celery
from consoles import signed_in
from flask import Flask
from sqlalchemy import Engine, bindparam, create_engine, orm, pool, text
from sqlalchemy.exc import ProgrammingError

import proj.jobs.testing
from proj.celery import make_celery
from proj.config import load_settings, use_settings
from proj.db import db
from proj.jobs import Jobs, auth, context, shared_task
from proj.jobs.engine import resolve_url
from proj.jobs.reconciler import reconcile
from proj.models import TENANT_TABLES
from proj.web import create_app

if TYPE_CHECKING:
    from conftest import Stack

ROOT = Path(__file__).resolve().parents[2]
INIT_SCRIPT = ROOT / "deploy" / "postgres" / "init" / "10-proj-roles.sh"
PROJ = Path(sys.executable).with_name("proj")


@dataclass(frozen=True)
class Roles:
    """A database made as the postgres image makes it, with proj's roles."""

    owner: str
    app: str
    owner_url: str
    app_url: str
    admin_url: str
    """A superuser on the same database."""


@contextmanager
def initialised_database() -> Iterator[Roles]:
    """A new database on which the init script made its two roles; the
    database and the roles are dropped afterwards."""
    host, port, superuser = stacks.POSTGRES
    suffix = uuid.uuid4().hex[:10]
    name, owner, app = f"proj_scratch_{suffix}", f"proj_owner_{suffix}", f"proj_app_{suffix}"
    passwords = {role: secrets.token_urlsafe(16) for role in (owner, app)}
    admin = psycopg2.connect(host=host, port=port, user=superuser, dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        ran = subprocess.run(
            ["sh", str(INIT_SCRIPT)],
            env={
                "PATH": os.environ["PATH"],
                "PGHOST": host,
                "PGPORT": str(port),
                "PGUSER": superuser,
                "POSTGRES_DB": name,
                "PROJ_OWNER_ROLE": owner,
                "PROJ_APP_ROLE": app,
                "PROJ_OWNER_PASSWORD": passwords[owner],
                "PROJ_APP_PASSWORD": passwords[app],
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr

        def url(role: str, password: str | None = None) -> str:
            secret = f":{password}" if password else ""
            return f"postgresql://{role}{secret}@{host}:{port}/{name}"

        yield Roles(
            owner, app, url(owner, passwords[owner]), url(app, passwords[app]), url(superuser)
        )
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cursor.execute(f'DROP ROLE IF EXISTS "{app}"')
            cursor.execute(f'DROP ROLE IF EXISTS "{owner}"')
        admin.close()


def proj_command(*args: str, database_url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """``proj ARGS`` as a container runs it, on ``database_url``."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROJ_", "CELERY_")) and key != "DATABASE_URL"
    }
    return subprocess.run(
        [str(PROJ), *args],
        env={**environ, "DATABASE_URL": database_url, **extra},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def roles() -> Iterator[Roles]:
    """The roles, and the database migrated as compose's migrate service does."""
    if shutil.which("psql") is None:
        pytest.skip("psql (which runs the init script) is not installed")
    if stacks.missing_services("postgres"):
        pytest.skip("PostgreSQL at {}:{} not reachable".format(*stacks.POSTGRES[:2]))
    with initialised_database() as made:
        migrated = proj_command("db", "upgrade", database_url=made.owner_url)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        yield made


@contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    engine = create_engine(resolve_url(url), poolclass=pool.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def test_the_application_role_is_bound_by_row_level_security(roles: Roles) -> None:
    """The application's role is neither superuser nor BYPASSRLS, may not
    make roles or databases, and is no member of the owner (whose tables it
    would then own); the owner is no superuser either."""
    query = text(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb,"
        " pg_has_role(:app, :owner, 'MEMBER') AS in_owner FROM pg_roles WHERE rolname = :role"
    )
    names = {"app": roles.app, "owner": roles.owner}
    with engine_for(roles.admin_url) as admin, admin.connect() as connection:
        app = connection.execute(query, {**names, "role": roles.app}).one()
        owner = connection.execute(query, {**names, "role": roles.owner}).one()
    assert not (app.rolsuper or app.rolbypassrls or app.rolcreaterole or app.rolcreatedb)
    assert not app.in_owner
    assert not (owner.rolsuper or owner.rolcreaterole or owner.rolcreatedb)


def test_the_owner_owns_every_table_the_migrations_make(roles: Roles) -> None:
    """Including Celery's result tables, which the application's role could
    not make at a worker's start."""
    with engine_for(roles.admin_url) as admin, admin.connect() as connection:
        owners = dict(
            connection.execute(
                text("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
            ).all()
        )
    expected = {*TENANT_TABLES, "jobs", "proj_api_tokens", "celery_taskmeta", "celery_tasksetmeta"}
    assert expected <= set(owners)
    assert set(owners.values()) == {roles.owner}


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE intruder (id int)",
        "ALTER TABLE users NO FORCE ROW LEVEL SECURITY",
        "ALTER TABLE invoices DISABLE ROW LEVEL SECURITY",
        "DROP POLICY tenant_isolation ON gateway_charges",
        "TRUNCATE jobs",
        "DROP TABLE proj_api_tokens",
    ],
)
def test_the_application_role_cannot_change_the_schema(roles: Roles, statement: str) -> None:
    refused = pytest.raises(ProgrammingError, match=r"permission denied|must be owner")
    with engine_for(roles.app_url) as engine, refused, engine.begin() as connection:
        connection.execute(text(statement))


def test_the_application_role_reads_every_table(roles: Roles) -> None:
    with engine_for(roles.admin_url) as admin, admin.connect() as connection:
        tables = connection.scalars(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).all()
    with engine_for(roles.app_url) as engine, engine.connect() as connection:
        for table in tables:
            connection.execute(text(f'SELECT 1 FROM "{table}" LIMIT 1'))


def test_proj_check_passes_as_the_application_and_names_the_owner(
    roles: Roles, stack: Stack
) -> None:
    """With tenants in use, ``proj check`` (compose's check service, the web
    pod's init container) passes as the application's role, and refuses the
    owner, which row-level security does not bind."""
    if not stack.on_postgres:
        pytest.skip("the roles are PostgreSQL's")
    with engine_for(roles.app_url) as engine, orm.Session(engine) as session, session.begin():
        auth.add_token(session, f"t-{uuid.uuid4().hex[:12]}", "viewer", tenant="acme")
    given = {
        "CELERY_BROKER_URL": stack.env["CELERY_BROKER_URL"],
        "SECRET_KEY": stack.env["SECRET_KEY"],
    }
    as_app = proj_command("check", database_url=roles.app_url, **given)
    assert as_app.returncode == 0, as_app.stdout + as_app.stderr
    as_owner = proj_command("check", database_url=roles.owner_url, **given)
    assert as_owner.returncode == 1
    assert f"{roles.owner} is a BYPASSRLS role" in as_owner.stderr


@contextmanager
def as_application(
    roles: Roles, stack: Stack, celery_app: Celery
) -> Iterator[tuple[Celery, Flask]]:
    """The reference application's Celery and Flask apps, connected as the
    application's role (made current; the test's own are restored after)."""
    if not stack.on_postgres:
        pytest.skip("the roles are PostgreSQL's")
    environ = {k: v for k, v in stack.env.items() if k != "CELERY_RESULT_BACKEND"}
    settings = load_settings({**environ, "DATABASE_URL": roles.app_url})
    own = make_celery(settings)
    flask_app = create_app(settings, own)
    use_settings(settings)
    own.set_current()
    own.set_default()
    try:
        own.control.purge()
        yield own, flask_app
    finally:
        Jobs.of(own).dispose()
        with flask_app.app_context():
            db.engine.dispose()
        own.close()
        use_settings(stack.settings)
        celery_app.set_current()
        celery_app.set_default()


def test_a_sign_up_reaches_its_welcome_mail_as_the_application_role(
    roles: Roles, stack: Stack, celery_app: Celery
) -> None:
    """The web application and a worker, both connected as the application's
    role: a tenant's sign-up is stored, its welcome job enqueued, claimed and
    run (the user marked welcomed), Celery's results stored, and the row is
    the tenant's alone."""
    with as_application(roles, stack, celery_app) as (own, flask_app):
        with Jobs.of(own).session_scope() as session:
            token = auth.add_token(session, f"t-{uuid.uuid4().hex[:12]}", "operator", tenant="acme")
        client = flask_app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        with proj.jobs.testing.worker(own, pool="threads", concurrency=2):
            created = client.post("/api/users", json={"email": f"{uuid.uuid4().hex}@example.com"})
            assert created.status_code == 201, created.get_data(as_text=True)
            user = created.get_json()["id"]
            welcomed = text("SELECT welcomed_at FROM users WHERE id = :id")
            with engine_for(roles.admin_url) as admin, admin.connect() as connection:
                proj.jobs.testing.wait_for(
                    lambda: connection.scalar(welcomed, {"id": user}), timeout=30
                )
                tenant = connection.scalar(
                    text("SELECT tenant FROM users WHERE id = :id"), {"id": user}
                )
        assert tenant == "acme"
        own.backend.store_result("deploy-roles-result", {"ok": True}, "SUCCESS")
        assert own.backend.get_task_meta("deploy-roles-result")["result"] == {"ok": True}
        # Without the tenant, the application's role sees none of its rows.
        with engine_for(roles.app_url) as engine, engine.connect() as connection:
            assert (
                connection.scalar(text("SELECT count(*) FROM users WHERE id = :id"), {"id": user})
                == 0
            )


COUNT_JOBS = "SELECT count(*) FROM jobs WHERE id IN :ids"


@shared_task(name="tests.deploy_roles.note", ignore_result=True)
def note(what: str) -> str:
    return what


@shared_task(name="tests.deploy_roles.refuse", ignore_result=True)
def refuse(what: str) -> None:
    raise ValueError(f"refused: {what}")


def test_a_tenants_jobs_are_its_own_and_the_ledger_still_runs_them(
    roles: Roles, stack: Stack, celery_app: Celery
) -> None:
    """Row-level security on ``jobs`` and ``job_attempts``, as the application's
    role: the ledger's own paths (the fast path's claim and success, the
    relay, a failure and its attempt, the reconciler) work on a tenant's
    jobs in the system scope, as do the console and the CLI; a transaction
    with no scope sees none of them, another tenant's neither, and the job
    API shows a tenant's jobs to its tokens only."""
    with as_application(roles, stack, celery_app) as (own, flask_app):
        jobs = Jobs.of(own)
        with context.tenant("acme"), jobs.session_scope() as session:
            failing = refuse.apply_async_on_commit(("now",), session=session)
            later = note.apply_async_on_commit(("later",), countdown=1, session=session)
        state = text("SELECT state FROM jobs WHERE id = :id")
        with engine_for(roles.admin_url) as admin, admin.connect() as watch:

            def now_in(job_id: str, *states: str) -> bool:
                watch.rollback()
                return watch.scalar(state, {"id": job_id}) in states

            with proj.jobs.testing.worker(own, pool="threads", concurrency=2):
                proj.jobs.testing.wait_for(lambda: now_in(failing, "failed"), timeout=30)
                proj.jobs.testing.wait_for(lambda: now_in(later, "succeeded"), timeout=30)
            # A run lost with its worker, taken back by the reconciler.
            with context.tenant("acme"), jobs.session_scope() as session:
                lost = note.apply_async_on_commit(("lost",), session=session)
            with admin.begin() as connection:
                connection.execute(
                    text(
                        "UPDATE jobs SET state = 'running', attempts = 1, worker = 'gone@x:1',"
                        " started_at = now() - interval '1 hour' WHERE id = :id"
                    ),
                    {"id": lost},
                )
            with jobs.session_scope() as session:
                assert reconcile(session, own, stale_after=60)["abandoned"] == 1
            assert now_in(lost, "retrying")

        ids = [failing, later, lost]
        with engine_for(roles.app_url) as engine:

            def seen(
                setting: str, query: str = "SELECT count(*) FROM jobs WHERE id IN :ids"
            ) -> int:
                with engine.begin() as connection:
                    if setting:
                        connection.execute(text(f"SET LOCAL {setting}"))
                    found = connection.scalar(
                        text(query).bindparams(bindparam("ids", expanding=True)), {"ids": ids}
                    )
                    return int(found or 0)

            attempts = "SELECT count(*) FROM job_attempts WHERE job_id IN :ids"
            assert seen("") == seen("", attempts) == 0
            assert seen("proj.tenant = 'globex'") == seen("proj.tenant = 'globex'", attempts) == 0
            assert seen("proj.tenant = 'acme'") == seen("proj.scope = 'system'") == 3
            assert seen("proj.tenant = 'acme'", attempts) == 2  # the failure's, the lost run's
            with engine.begin() as connection:
                connection.execute(text("SET LOCAL proj.tenant = 'globex'"))
                cancelled = connection.execute(
                    text("UPDATE jobs SET state = 'cancelled' WHERE id = :id"), {"id": failing}
                )
                assert cancelled.rowcount == 0

        with jobs.session_scope() as session:
            tokens = {
                tenant: auth.add_token(session, f"t-{uuid.uuid4().hex[:12]}", "viewer", tenant)
                for tenant in ("acme", "globex", None)
            }
        client = flask_app.test_client()
        for tenant, token in tokens.items():
            answer = client.get(
                f"/api/jobs/{failing}", headers={"Authorization": f"Bearer {token}"}
            )
            assert answer.status_code == (200 if tenant == "acme" else 404), tenant
        assert (
            "refused: now"
            in client.get(
                f"/api/jobs/{failing}", headers={"Authorization": f"Bearer {tokens['acme']}"}
            ).get_json()["error"]
        )

        operator = signed_in(flask_app, "operator")
        assert failing in operator.get("/dashboard/jobs", query_string={"tenant": "acme"}).text
        shown = proj_command("jobs", "show", failing, database_url=roles.app_url)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "refused: now" in shown.stdout
