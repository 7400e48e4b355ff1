"""A job's context crosses the queue: what was current at enqueue (the tenant,
the request id, an application's own field) is current during the run, on
the fast path and through the relay, whoever publishes; each of the run's
transactions on PostgreSQL begins with the tenant set, and it does not
outlive the transaction on the pooled connection."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

import proj.jobs.testing
from proj.db import Session, session_scope
from proj.jobs import Jobs, auth, context, shared_task
from proj.jobs.models import Job
from proj.jobs.relay import make_relay

if TYPE_CHECKING:
    from conftest import Stack

region: ContextVar[str | None] = ContextVar("test_region", default=None)
context.carry("region", region)


@shared_task(name="tests.context.seen")
def seen() -> dict[str, Any]:
    """What the run sees of its context, and what its transaction was given."""
    setting = None
    if Session.get_bind().dialect.name == "postgresql":
        setting = Session.scalar(text("SELECT current_setting('proj.tenant', true)"))
    return {
        "tenant": context.current_tenant(),
        "request_id": context.request_id_var.get(),
        "region": region.get(),
        "setting": setting,
    }


@shared_task(name="tests.context.fails")
def fails() -> None:
    """Fail for good (nothing retries a ValueError)."""
    raise ValueError("fails for the test")


@pytest.fixture
def fast_path_off(celery_app: Celery) -> Iterator[None]:
    jobs = Jobs.of(celery_app)
    settings = jobs.settings
    jobs.settings = replace(settings, outbox_fast_path=False)
    yield
    jobs.settings = settings


def enqueue_as(tenant: str | None, request_id: str, place: str) -> str:
    with context.tenant(tenant), session_scope() as session:
        request_token = context.request_id_var.set(request_id)
        region_token = region.set(place)
        try:
            return seen.apply_async_on_commit(session=session)
        finally:
            region.reset(region_token)
            context.request_id_var.reset(request_token)


def test_the_run_sees_the_context_it_was_enqueued_in(stack: Stack, purged: Celery) -> None:
    job_id = enqueue_as("acme", "req-1", "north")
    with proj.jobs.testing.worker(purged):
        done = proj.jobs.testing.wait_for_state(job_id, "succeeded", celery_app=purged)
    assert done.tenant == "acme"
    assert done.context == {"tenant": "acme", "request_id": "req-1", "region": "north"}
    setting = "acme" if stack.on_postgres else None
    assert done.result == {
        "tenant": "acme",
        "request_id": "req-1",
        "region": "north",
        "setting": setting,
    }


def test_the_relay_publishes_each_job_in_its_own_context(
    stack: Stack, purged: Celery, fast_path_off: None
) -> None:
    """The relay runs in a context of its own (here another tenant's): the
    jobs it publishes still carry theirs, from their rows."""
    owed = {tenant: enqueue_as(tenant, f"req-{tenant}", "south") for tenant in ("acme", "globex")}
    relay = make_relay(purged, replace(stack.settings.jobs, relay_grace=0.0))
    try:
        with context.tenant("initech"):
            assert relay.relay_once() == 2
    finally:
        relay.engine.dispose()
    with proj.jobs.testing.worker(purged):
        for tenant, job_id in owed.items():
            done = proj.jobs.testing.wait_for_state(job_id, "succeeded", celery_app=purged)
            assert done.result["tenant"] == tenant
            assert done.result["request_id"] == f"req-{tenant}"


def test_no_tenant_is_no_tenant_and_none_outlives_its_transaction(
    stack: Stack, purged: Celery
) -> None:
    if not stack.on_postgres:
        pytest.skip("SET LOCAL is PostgreSQL's")
    first = enqueue_as("acme", "req-a", "east")
    second = enqueue_as(None, "req-b", "east")
    with proj.jobs.testing.worker(purged, concurrency=1):
        a = proj.jobs.testing.wait_for_state(first, "succeeded", celery_app=purged)
        b = proj.jobs.testing.wait_for_state(second, "succeeded", celery_app=purged)
    assert a.result["setting"] == "acme"
    # Same pool, one connection: the second run's transaction has no tenant.
    assert b.result["tenant"] is None
    assert b.result["setting"] in (None, "")
    assert b.tenant is None


def test_a_tenant_token_sees_only_its_tenant_s_jobs(app: Flask, purged: Celery) -> None:
    mine, theirs = enqueue_as("acme", "r1", "x"), enqueue_as("globex", "r2", "x")
    with app.app_context():
        from proj.db import db

        token = auth.add_token(db.session, f"acme-{uuid.uuid4().hex[:6]}", "viewer", "acme")
        db.session.commit()
    client: FlaskClient = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    assert client.get(f"/api/jobs/{mine}").get_json()["tenant"] == "acme"
    assert client.get(f"/api/jobs/{theirs}").status_code == 404
    listed = {job["id"] for job in client.get("/api/jobs?limit=500").get_json()["jobs"]}
    assert mine in listed and theirs not in listed
    with session_scope() as session:
        assert {session.get(Job, theirs).tenant} == {"globex"}  # type: ignore[union-attr]


def test_a_tenant_is_a_slug(app: Flask) -> None:
    with app.app_context():
        from proj.db import db

        with pytest.raises(auth.AuthError, match="tenant"):
            auth.add_token(db.session, "bad", "viewer", "Acme Corp")
        db.session.rollback()


def test_a_failed_plain_task_keeps_its_tenant(purged: Celery) -> None:
    """A plain ``.delay()`` has no row until it fails; the failed row it gets
    is the tenant's it ran for, so only that tenant's tokens read it."""
    with context.tenant("acme"):
        task_id = fails.delay().id
    with proj.jobs.testing.worker(purged):
        [failed] = proj.jobs.testing.wait_for(lambda: proj.jobs.testing.failed_jobs(task_id))
    assert failed.tenant == "acme"
