"""Pausing a queue, on every stack: while it is paused nothing of it runs,
neither the jobs the relay holds nor those already in the broker (a worker
hands them back to the ledger, unrun and with no attempt counted); resumed,
each runs once. The API that pauses and resumes records who did it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from consoles import csrf_of, signed_in
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from stacks import queue_depth

import proj.jobs.testing
from proj.db import db, session_scope
from proj.jobs import Jobs, SqlAlchemyTask, auth, shared_task
from proj.jobs.audit import Action, AuditEntry
from proj.jobs.models import CLAIMABLE, Job, State
from proj.jobs.relay import make_relay

RAN: list[str] = []
"""The ids of the jobs this module's task ran, once per run."""


@shared_task(name="tests.queue_pause.note", bind=True, ignore_result=True)
def note(self: SqlAlchemyTask) -> None:
    RAN.append(str(self.request.id))


@pytest.fixture
def queue(purged: Celery, client: FlaskClient) -> Iterator[str]:
    """The default queue, resumed after the test whatever it did."""
    name = str(purged.conf.task_default_queue)
    yield name
    client.post(f"/api/queues/{name}/resume")


def count(*conditions: object) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0)


def test_a_paused_queue_runs_nothing_until_resumed_then_each_job_once(
    purged: Celery, client: FlaskClient, queue: str
) -> None:
    """50 jobs in the broker, then the pause, then 200 held in the ledger: a
    worker runs none of them (it hands the 50 back, unrun and with no
    attempt counted), and the relay does not spin on them. Resumed, all 250
    run, each once."""
    with session_scope() as session:
        sent = [note.apply_async_on_commit(session=session) for _ in range(50)]
    assert Jobs.of(purged).flush()
    assert queue_depth(purged) == 50
    answer = client.post(f"/api/queues/{queue}/pause")
    assert answer.status_code == 200 and answer.get_json()["paused"] is True
    with session_scope() as session:
        held = note.enqueue_many([() for _ in range(200)], session=session)
    relay = make_relay(purged)
    try:
        assert relay.relay_once() == 0
        assert relay.pause() == relay.poll_interval
    finally:
        relay.engine.dispose()
    ids = [*sent, *held]
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(lambda: queue_depth(purged) == 0, timeout=30)
        proj.jobs.testing.wait_for(
            lambda: count(Job.id.in_(sent), Job.published_at.is_(None)) == 50, timeout=30
        )
        listed = client.get("/api/queues").get_json()["queues"]
        waiting = count(Job.queue == queue, Job.state.in_(CLAIMABLE), Job.tenant.is_(None))
        assert waiting >= 250
        (mine,) = (found for found in listed if found["name"] == queue)
        assert (mine["paused"], mine["waiting"]) == (True, waiting)
    assert not set(RAN) & set(ids)
    assert count(Job.id.in_(ids), Job.state == State.QUEUED, Job.attempts == 0) == 250
    assert client.post(f"/api/queues/{queue}/resume").get_json()["paused"] is False
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(
            lambda: count(Job.id.in_(ids), Job.state == State.SUCCEEDED) == 250, timeout=60
        )
    assert sorted(run for run in RAN if run in set(ids)) == sorted(ids)
    assert count(Job.id.in_(ids), Job.attempts == 1) == 250


def test_pausing_takes_an_operator_with_no_tenant_and_is_audited(
    app: Flask, client: FlaskClient, make_token: object, queue: str
) -> None:
    """An operator's token pauses and resumes, each recorded once (a second
    pause keeps the first's author); a viewer's, or a tenant's, is refused;
    a name no queue can have is a 400 naming it."""
    first = client.post(f"/api/queues/{queue}/pause").get_json()
    again = client.post(f"/api/queues/{queue}/pause").get_json()
    assert first == again and first["paused_by"].startswith("token:test-")
    for role, tenant in (("viewer", None), ("operator", "acme")):
        other = app.test_client()
        token = make_token(app, role) if tenant is None else _tenant_token(app, tenant)
        other.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        assert other.post(f"/api/queues/{queue}/resume").status_code == 403
        assert other.get("/api/queues").status_code == 200
    bad = client.post("/api/queues/a%00b/pause")
    assert bad.status_code == 400 and bad.get_json()["error"]["fields"] == {"queue": "a\x00b"}
    assert client.post(f"/api/queues/{queue}/resume").get_json()["paused"] is False
    with session_scope() as session:
        actions = session.scalars(
            select(AuditEntry.action)
            .where(AuditEntry.target == queue, AuditEntry.actor == first["paused_by"])
            .order_by(AuditEntry.id)
        ).all()
    assert actions == [Action.QUEUE_PAUSE, Action.QUEUE_RESUME]


def _tenant_token(app: Flask, tenant: str) -> str:
    with app.app_context():
        token = auth.add_token(db.session, f"test-{uuid.uuid4().hex[:12]}", "operator", tenant)
        db.session.commit()
    return token


def test_the_console_overview_pauses_and_resumes_a_queue(app: Flask, queue: str) -> None:
    """An operator pauses the default queue from the overview, which then says
    who paused it; a viewer sees that, with no button, and may not resume it."""
    operator = signed_in(app, "operator")
    page = operator.get("/dashboard/").text
    assert _queue_row(page, queue)["data-paused"] == "no"
    done = operator.post(f"/dashboard/queues/{queue}/pause", data={"csrf_token": csrf_of(page)})
    assert done.status_code == 302
    page = operator.get("/dashboard/").text
    row = _queue_row(page, queue)
    assert row["data-paused"] == "yes" and "paused by account:operator-" in row["text"]
    assert "Resume" in row["text"]
    viewer = signed_in(app, "viewer")
    seen = viewer.get("/dashboard/").text
    assert _queue_row(seen, queue)["data-paused"] == "yes"
    assert "Resume" not in _queue_row(seen, queue)["text"]
    refused = viewer.post(f"/dashboard/queues/{queue}/resume", data={"csrf_token": csrf_of(seen)})
    assert refused.status_code == 403
    operator.post(f"/dashboard/queues/{queue}/resume", data={"csrf_token": csrf_of(page)})
    assert _queue_row(operator.get("/dashboard/").text, queue)["data-paused"] == "no"


def _queue_row(page: str, queue: str) -> dict[str, str]:
    """The overview's row for ``queue`` in its queues table: its ``data-paused``
    and its text (tags dropped)."""
    table = page.split('id="queue-pauses"', 1)[1].split("</table>", 1)[0]
    found = re.search(
        rf'<tr data-queue="{re.escape(queue)}" data-paused="(\w+)">(.*?)</tr>', table, re.S
    )
    assert found is not None, f"no row for queue {queue}"
    return {
        "data-paused": found.group(1),
        "text": " ".join(re.sub("<[^>]+>", " ", found.group(2)).split()),
    }
