"""The audit trail on real databases: each retry and cancel (through the job
API and the console, one job or many), console sign-in (failed ones too)
and sign-out, and each token or account command leaves one entry saying
who, what, to what and how many, when and from where; an action refused or
rolled back leaves none; ``GET /api/audit`` pages them newest first, a
tenant's token seeing its tenant's alone; the console shows them; and
``Jobs.prune`` deletes those past the retention.

Requests go through Flask's test client and the commands through click's
runner, on the stack's database; entries are read back from the table.
"""

from __future__ import annotations

import dataclasses
import html
import re
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from click.testing import CliRunner, Result
from consoles import PASSWORD, csrf_of, signed_in
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sqlalchemy import func, select, update

import proj.jobs.testing
from proj.db import db as web_db
from proj.db import session_scope, worker_engine
from proj.jobs import Jobs, auth, cli, outbox, utcnow
from proj.jobs.audit import CLI, Action, AuditEntry, record
from proj.jobs.ledger import record_failure
from proj.jobs.testing import InMemoryQueue
from proj.web import create_app
from proj.web.openapi import document

if TYPE_CHECKING:
    from conftest import Stack

ADDRESS = "203.0.113.7"
"""The client address the tests' requests come from."""
DOCUMENT = document()
REGISTRY = Registry().with_resource("urn:doc", Resource(DOCUMENT, DRAFT202012))


def tag() -> str:
    return uuid.uuid4().hex[:12]


def last_id() -> int:
    """The newest entry's id (0: none yet)."""
    with session_scope() as session:
        return int(session.scalar(select(func.max(AuditEntry.id))) or 0)


def entries(*where: Any) -> list[AuditEntry]:
    """The entries meeting ``where``, oldest first."""
    with session_scope() as session:
        found = list(session.scalars(select(AuditEntry).where(*where).order_by(AuditEntry.id)))
        session.expunge_all()
        return found


def failed(name: str, tenant: str | None = None) -> str:
    """A new failed job of ``tenant``."""
    job_id = str(uuid.uuid4())
    record_failure(worker_engine(), job_id=job_id, name=name, error="no", tenant=tenant)
    return job_id


def queued(celery_app: Celery, name: str) -> str:
    """A new queued job (its message goes to the in-memory queue)."""
    with session_scope() as session:
        return outbox.enqueue(
            session, Jobs.of(celery_app), name, [], {}, max_attempts=1, options={}
        )


def token_client(
    app: Flask, tenant: str | None = None, role: str = "operator"
) -> tuple[FlaskClient, str]:
    """A client sending a new token of ``role`` for ``tenant`` from
    :data:`ADDRESS`, and the token's actor (``token:<name>``)."""
    name = f"audit-{tag()}"
    with app.app_context():
        token = auth.add_token(web_db.session, name, role, tenant=tenant)
        web_db.session.commit()
    made = app.test_client()
    made.environ_base.update(HTTP_AUTHORIZATION=f"Bearer {token}", REMOTE_ADDR=ADDRESS)
    return made, f"token:{name}"


def account_of(browser: FlaskClient) -> str:
    """The email a browser is signed in with (the console's bar shows it)."""
    found = re.search(r"<span>([^ <]+) · ", browser.get("/dashboard/").text)
    assert found is not None
    return html.unescape(found.group(1))


@pytest.fixture
def operator(app: Flask, memory: InMemoryQueue) -> FlaskClient:
    browser = signed_in(app, "operator")
    browser.environ_base["REMOTE_ADDR"] = ADDRESS
    return browser


def test_the_job_api_records_retry_and_cancel(
    app: Flask, celery_app: Celery, memory: InMemoryQueue
) -> None:
    """Who (the token), what, which job, its tenant, from where; a cancel
    says what the job was. A refused action (409) leaves no entry."""
    tenant = f"t{tag()}"
    client, actor = token_client(app, tenant)
    plain, plain_actor = token_client(app)
    name = f"tests.audit.{tag()}"
    retried = failed(name, tenant)
    waiting = queued(celery_app, name)

    assert client.post(f"/api/jobs/{retried}/retry").status_code == 202
    assert plain.post(f"/api/jobs/{waiting}/cancel").status_code == 200
    assert client.post(f"/api/jobs/{retried}/retry").status_code == 409  # queued now

    mine = entries(AuditEntry.target.in_([retried, waiting]))
    assert [(e.actor, e.action, e.target, e.tenant, e.address) for e in mine] == [
        (actor, "job.retry", retried, tenant, ADDRESS),
        (plain_actor, "job.cancel", waiting, None, ADDRESS),
    ]
    assert mine[1].detail == {"was": "queued"}
    assert all(abs(utcnow() - e.at) < timedelta(minutes=1) for e in mine)


def test_an_action_rolled_back_leaves_no_entry(
    app: Flask, memory: InMemoryQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry that fails after its entry is written (here: answering it)
    rolls both back: the job is still failed, and nothing is recorded."""
    client, _ = token_client(app)
    job_id = failed(f"tests.audit.{tag()}")

    def broken(self: Any) -> dict[str, Any]:
        raise RuntimeError("the answer could not be made")

    monkeypatch.setattr(proj.jobs.Job, "to_json", broken)
    assert client.post(f"/api/jobs/{job_id}/retry").status_code == 500
    monkeypatch.undo()

    assert proj.jobs.testing.job(job_id).state == "failed"
    assert entries(AuditEntry.target == job_id) == []


def test_record_joins_the_sessions_transaction_or_makes_its_own(celery_app: Celery) -> None:
    """Rolled back with its session, it is gone; on an engine, it is committed."""
    target = f"audit-{tag()}"
    with session_scope() as session:
        record(session, Action.TOKEN_ADD, actor=CLI, target=target)
        session.rollback()
    assert entries(AuditEntry.target == target) == []
    record(Jobs.of(celery_app).engine, Action.TOKEN_ADD, actor=CLI, target=target)
    assert [e.action for e in entries(AuditEntry.target == target)] == ["token.add"]


def test_the_console_records_single_and_bulk_actions(
    celery_app: Celery, operator: FlaskClient
) -> None:
    """A job's retry and cancel name the job; a bulk cancel of every job
    matching a filter says how many it cancelled, the filter and the counts;
    a bulk retry of ticked jobs names the jobs it retried."""
    email = account_of(operator)
    name, single = f"tests.audit.{tag()}", f"tests.audit.{tag()}"
    one_failed, one_waiting = failed(single), queued(celery_app, single)
    csrf = csrf_of(operator.get("/dashboard/jobs").text)
    operator.post(f"/dashboard/jobs/{one_failed}/retry", data={"csrf_token": csrf})
    operator.post(f"/dashboard/jobs/{one_waiting}/cancel", data={"csrf_token": csrf})

    waiting = [queued(celery_app, name) for _ in range(3)]
    matching = {"action": "cancel", "scope": "matching", "name": name, "state": "queued"}
    operator.post("/dashboard/jobs/act", data={**matching, "csrf_token": csrf, "expected": "3"})
    ticked = [failed(name) for _ in range(2)]
    selected = {"action": "retry", "scope": "selected", "job_id": [*ticked, waiting[0]]}
    operator.post("/dashboard/jobs/act", data={**selected, "csrf_token": csrf, "expected": "2"})

    mine = entries(AuditEntry.actor == f"account:{email}", AuditEntry.action != "session.sign_in")
    assert [(e.action, e.tenant, e.address) for e in mine] == [
        ("job.retry", None, ADDRESS),
        ("job.cancel", None, ADDRESS),
        ("jobs.bulk_cancel", None, ADDRESS),
        ("jobs.bulk_retry", None, ADDRESS),
    ]
    single_retry, single_cancel, bulk_cancel, bulk_retry = mine
    assert (single_retry.target, single_cancel.target) == (one_failed, one_waiting)
    assert bulk_cancel.target == "3 jobs"
    assert bulk_cancel.detail is not None
    assert bulk_cancel.detail["filter"] == {"name": name, "state": "queued"}
    assert (bulk_cancel.detail["done"], bulk_cancel.detail["picked"]) == (3, 3)
    assert sorted(bulk_cancel.detail["job_ids"]) == sorted(waiting)
    assert bulk_retry.target == "2 jobs"
    assert bulk_retry.detail is not None
    assert bulk_retry.detail["filter"] is None
    assert (bulk_retry.detail["done"], bulk_retry.detail["skipped"]) == (2, 1)
    assert bulk_retry.detail["job_ids"] == ticked


def sign_in(client: FlaskClient, email: str, password: str, **environ: str) -> int:
    form = {"email": email, "password": password, "next": ""}
    token = csrf_of(client.get("/dashboard/login", environ_base=environ).text)
    answer = client.post(
        "/dashboard/login", data={**form, "csrf_token": token}, environ_base=environ
    )
    return answer.status_code


def test_sign_in_failed_sign_in_and_sign_out_are_recorded(app: Flask) -> None:
    """A wrong password names the account; an email no account has is not
    kept (it may be a password typed in the wrong field); a sign-in and a
    sign-out name the account. Each from the client's address."""
    email = f"audit-{tag()}@example.com"
    with app.app_context():
        auth.add_account(web_db.session, email, PASSWORD, "viewer")
        web_db.session.commit()
    browser = app.test_client()
    typed = f"not-an-email-{tag()}"
    before = last_id()

    assert sign_in(browser, email.upper(), "wrong password", REMOTE_ADDR=ADDRESS) == 401
    assert sign_in(browser, typed, PASSWORD, REMOTE_ADDR=ADDRESS) == 401
    assert sign_in(browser, email, PASSWORD, REMOTE_ADDR=ADDRESS) == 302
    csrf = csrf_of(browser.get("/dashboard/").text)
    assert browser.post("/dashboard/logout", data={"csrf_token": csrf}).status_code == 302

    mine = entries(AuditEntry.id > before, AuditEntry.action.startswith("session."))
    assert [(e.actor, e.action, e.target, e.detail) for e in mine] == [
        ("anonymous", "session.sign_in_failed", email, {"reason": "wrong password"}),
        ("anonymous", "session.sign_in_failed", None, {"reason": "no such account"}),
        (f"account:{email}", "session.sign_in", None, None),
        (f"account:{email}", "session.sign_out", None, None),
    ]
    assert [e.address for e in mine] == [ADDRESS, ADDRESS, ADDRESS, "127.0.0.1"]
    assert not any(typed in str(e.to_json()) for e in entries(AuditEntry.id > before))


def test_attempts_the_limit_refuses_are_not_recorded(app: Flask) -> None:
    """Only the attempts the limit lets through: refused ones could be sent
    without end."""
    app.config["PROJ_LOGIN_RATE_LIMIT"] = "2/minute"
    address = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    tried = [f"nobody-{tag()}@example.com" for _ in range(4)]
    statuses = [sign_in(app.test_client(), email, "x", REMOTE_ADDR=address) for email in tried]
    assert statuses == [401, 401, 429, 429]
    recorded = entries(AuditEntry.address == address, AuditEntry.action == "session.sign_in_failed")
    assert len(recorded) == 2


def test_the_address_is_the_one_the_trusted_proxy_saw(stack: Stack, celery_app: Celery) -> None:
    """Behind ``PROJ_TRUSTED_PROXIES=1``, the address the proxy appended."""
    proxied = create_app(dataclasses.replace(stack.settings, trusted_proxies=1), celery_app)
    proxied.config["PROJ_RATELIMIT_STORAGE_URI"] = "memory://"
    try:
        email = f"proxied-{tag()}@example.com"
        environ = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.9"}
        assert sign_in(proxied.test_client(), email, "x", **environ) == 401
    finally:
        with proxied.app_context():
            web_db.engine.dispose()
    (found,) = entries(
        AuditEntry.action == "session.sign_in_failed", AuditEntry.address == "198.51.100.9"
    )
    assert found.target is None


def run(command: Any, args: list[str], celery_app: Celery, stdin: str = "") -> Result:
    """``command`` (a group of :mod:`proj.jobs.cli`) with ``args``, on the stack's ledger."""
    env = {"DATABASE_URL": Jobs.of(celery_app).database_url}
    done = CliRunner().invoke(command, args, input=stdin, env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return done


def test_token_and_account_commands_are_recorded(celery_app: Celery) -> None:
    """By ``cli``, with the login name they ran under; a command refused
    (a token revoked twice) leaves no entry."""
    name, email = f"audit-{tag()}", f"audit-{tag()}@example.com"
    run(
        cli.token,
        ["add", name, "--role", "viewer", "--tenant", "acme", "--expires", "2d"],
        celery_app,
    )
    run(cli.token, ["revoke", name], celery_app)
    again = CliRunner().invoke(
        cli.token, ["revoke", name], env={"DATABASE_URL": Jobs.of(celery_app).database_url}
    )
    assert again.exit_code != 0
    password = f"{PASSWORD}\n"
    run(cli.admin, ["add", email, "--role", "operator"], celery_app, stdin=password)
    run(cli.admin, ["password", email], celery_app, stdin=password)
    run(cli.admin, ["remove", email], celery_app)

    mine = entries(AuditEntry.target.in_([name, email]))
    assert [(e.actor, e.action, e.target, e.address, e.tenant) for e in mine] == [
        ("cli", "token.add", name, None, None),
        ("cli", "token.revoke", name, None, None),
        ("cli", "account.add", email, None, None),
        ("cli", "account.password", email, None, None),
        ("cli", "account.remove", email, None, None),
    ]
    assert all(e.detail is not None and "os_user" in e.detail for e in mine)
    assert mine[0].detail is not None
    assert {k: mine[0].detail[k] for k in ("role", "tenant", "expires_in_seconds")} == {
        "role": "viewer",
        "tenant": "acme",
        "expires_in_seconds": 2 * 86400,
    }
    assert mine[2].detail is not None and mine[2].detail["role"] == "operator"


def valid(page: Any) -> None:
    """``page`` matches the OpenAPI document's ``AuditPage``."""
    schema = {"$ref": "urn:doc#/components/schemas/AuditPage"}
    Draft202012Validator(schema, registry=REGISTRY).validate(page)


def test_the_api_pages_a_tenants_entries_newest_first(app: Flask) -> None:
    """Five entries of a new tenant, two a page: three pages, newest first,
    each entry once; that tenant's token sees nothing of another tenant's,
    and a token with no tenant sees none of either."""
    tenant, other = f"t{tag()}", f"t{tag()}"
    reader, _ = token_client(app, tenant, role="viewer")
    for n in range(5):
        record(worker_engine(), Action.JOB_RETRY, actor="token:x", target=f"j{n}", tenant=tenant)
    record(worker_engine(), Action.JOB_RETRY, actor="token:y", target="theirs", tenant=other)

    seen, url, pages = [], "/api/audit?limit=2", 0
    while url:
        answer = reader.get(url)
        assert answer.status_code == 200, answer.text
        page = answer.get_json()
        valid(page)
        seen += [entry["target"] for entry in page["entries"]]
        url, pages = page["next"], pages + 1
    assert seen == ["j4", "j3", "j2", "j1", "j0"]
    assert pages == 3
    assert {e["tenant"] for e in reader.get("/api/audit?limit=500").get_json()["entries"]} == {
        tenant
    }
    nobodys = token_client(app)[0].get("/api/audit?limit=500").get_json()["entries"]
    assert not {e["tenant"] for e in nobodys} & {tenant, other}


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=501", "limit=x", "before=0", "before=-1", "before=²", f"before={2**63}"],
)
def test_a_query_that_cannot_be_used_is_400(app: Flask, query: str) -> None:
    answer = token_client(app, role="viewer")[0].get(f"/api/audit?{query}")
    assert answer.status_code == 400, answer.text
    assert answer.get_json()["error"]["code"] == "invalid_query"


def test_the_console_shows_the_trail_to_every_account(app: Flask, operator: FlaskClient) -> None:
    """Its page lists the newest entries with a link to each job acted on,
    pages older ones, and a visitor is sent to sign in."""
    job_id = str(uuid.uuid4())
    record(worker_engine(), Action.JOB_CANCEL, actor="token:pager", target=job_id)
    viewer = signed_in(app, "viewer")
    page = viewer.get("/dashboard/audit")
    assert page.status_code == 200
    assert 'href="/dashboard/audit" aria-current="page">Audit<' in page.text
    assert f'href="/dashboard/jobs/{job_id}"' in page.text
    older = re.search(r'<a href="([^"]+)" rel="next">', page.text)
    if older is not None:
        assert viewer.get(html.unescape(older.group(1))).status_code == 200
    assert viewer.get("/dashboard/audit?before=x").status_code == 400
    assert app.test_client().get("/dashboard/audit").status_code == 302


def test_prune_deletes_entries_past_the_retention(celery_app: Celery) -> None:
    jobs = Jobs.of(celery_app)
    old, recent = f"old-{tag()}", f"recent-{tag()}"
    for target in (old, recent):
        record(jobs.engine, Action.TOKEN_ADD, actor=CLI, target=target)
    past = utcnow() - timedelta(days=jobs.settings.retention_days, minutes=1)
    with session_scope() as session:
        session.execute(update(AuditEntry).where(AuditEntry.target == old).values(at=past))

    with jobs.session_scope() as session:
        jobs.prune(session)

    assert [e.target for e in entries(AuditEntry.target.in_([old, recent]))] == [recent]
