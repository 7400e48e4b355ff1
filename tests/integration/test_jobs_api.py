"""The job API on real databases, brokers and workers: reports are accepted
as jobs whose status the ledger answers, failed jobs are retried and waiting
ones cancelled (and then never run), and every refusal is JSON."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from logging.handlers import BufferingHandler
from typing import Any

import pytest
from celery import Celery
from flask.testing import FlaskClient

import proj.jobs.testing
from proj.db import Session, session_scope, worker_engine
from proj.jobs import SqlAlchemyTask, shared_task
from proj.jobs.ledger import State, record_failure
from proj.models import Invoice, User

FIELDS = {
    "id", "name", "state", "attempts", "progress", "result", "error",
    "created_at", "started_at", "finished_at",
}  # fmt: skip
RUNNING: dict[str, threading.Event] = {}
RELEASE: dict[str, threading.Event] = {}
RUNS: dict[str, int] = {}
"""How many times each job id ran, in this process."""


@shared_task(name="tests.jobs.wait", bind=True)
def wait(self: SqlAlchemyTask, key: str) -> str:
    """Say it is running, then wait to be released."""
    RUNS[str(self.request.id)] = RUNS.get(str(self.request.id), 0) + 1
    RUNNING[key].set()
    RELEASE[key].wait(timeout=60)
    return key


@shared_task(name="tests.jobs.fails_once", bind=True)
def fails_once(self: SqlAlchemyTask, email: str) -> str:
    """Fail on the first run (a ValueError, not retried); sign ``email`` up on the next."""
    job_id = str(self.request.id)
    RUNS[job_id] = RUNS.get(job_id, 0) + 1
    if RUNS[job_id] == 1:
        raise ValueError("failing the first time, as asked")
    Session.add(User(email=email))
    return email


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


def new_email() -> str:
    return f"jobs-{uuid.uuid4().hex}@example.com"


def user_with_invoices(*amounts: int, charged: int = 0) -> int:
    """A user with invoices of ``amounts`` cents, the first ``charged`` of them charged."""
    with session_scope() as session:
        user = User(email=new_email())
        session.add(user)
        session.flush()
        for n, amount in enumerate(amounts):
            status = "charged" if n < charged else "open"
            session.add(Invoice(user_id=user.id, amount_cents=amount, status=status))
        return user.id


def get_job(client: FlaskClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def in_state(client: FlaskClient, job_id: str, state: State) -> dict[str, Any] | None:
    found = get_job(client, job_id)
    return found if found["state"] == state else None


def signed_up(email: str) -> bool:
    with session_scope() as session:
        return session.query(User).filter_by(email=email).count() == 1


def test_report_is_a_job_the_api_follows(client: FlaskClient, purged: Celery) -> None:
    """POST /api/reports answers 202 with the job id and where to follow it;
    the job reads as queued with every documented field, then as succeeded
    with the report's summary once a worker ran it."""
    user_id = user_with_invoices(100, 250, 400, charged=1)

    response = client.post("/api/reports", json={"user_id": user_id})

    assert response.status_code == 202
    job_id = response.get_json()["job_id"]
    assert response.headers["Location"] == f"/api/jobs/{job_id}"
    queued = client.get(response.headers["Location"]).get_json()
    assert set(queued) >= FIELDS
    assert queued["id"] == job_id and queued["name"] == "proj.tasks.generate_report"
    assert (queued["state"], queued["attempts"], queued["started_at"]) == ("queued", 0, None)
    assert queued["created_at"] is not None
    with proj.jobs.testing.worker(purged):
        done = proj.jobs.testing.wait_for(lambda: in_state(client, job_id, State.SUCCEEDED))
    assert done["result"] == {
        "user_id": user_id, "invoices": 3, "charged": 1, "total_cents": 750, "charged_cents": 100,
    }  # fmt: skip
    assert done["attempts"] == 1 and done["error"] is None
    assert done["started_at"] is not None and done["finished_at"] >= done["started_at"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "invalid_fields"),
        ({"user_id": "1"}, 400, "invalid_fields"),
        ({"user_id": 0}, 400, "invalid_fields"),
        ({"user_id": True}, 400, "invalid_fields"),
        ({"user_id": 2**31 - 1}, 400, "invalid_fields"),
        ([1], 400, "invalid_body"),
    ],
)
def test_report_requests_that_are_refused(
    client: FlaskClient, body: Any, status: int, code: str
) -> None:
    """A report for no user, or a body that is not an object with a valid
    ``user_id``, is refused with a JSON error."""
    response = client.post("/api/reports", json=body)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code


def test_report_request_that_is_not_json(client: FlaskClient) -> None:
    """A body that is not JSON is refused with 415 (or 400 when malformed)."""
    plain = client.post("/api/reports", data="user_id=1")
    assert plain.status_code == 415 and plain.get_json()["error"]["code"]
    broken = client.post("/api/reports", data="{", content_type="application/json")
    assert broken.status_code == 400
    assert broken.get_json()["error"]["code"] == "malformed_json"


def test_unknown_job_is_404(client: FlaskClient) -> None:
    """An id proj never issued is 404, for reading, retrying and cancelling."""
    unknown = str(uuid.uuid4())
    for response in (
        client.get(f"/api/jobs/{unknown}"),
        client.post(f"/api/jobs/{unknown}/retry"),
        client.post(f"/api/jobs/{unknown}/cancel"),
        client.get(f"/api/jobs/{'x' * 300}"),
        client.get("/api/jobs/a%00b"),  # PostgreSQL refuses a NUL in text: still a 404
        client.get("/api/jobs?before=a%00b"),
    ):
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"


def test_a_running_job_that_never_checks_finishes_normally(
    client: FlaskClient, purged: Celery
) -> None:
    """While a job runs, retry is 409 and changes nothing; cancel is 202 and
    says the job is asked to stop; a job that never checks then succeeds as
    it would have, and a succeeded job can be neither retried nor cancelled."""
    key = uuid.uuid4().hex
    RUNNING[key], RELEASE[key] = threading.Event(), threading.Event()
    job_id = wait.apply_async_on_commit((key,))
    try:
        with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
            assert RUNNING[key].wait(timeout=30)
            assert get_job(client, job_id)["state"] == "running"
            response = client.post(f"/api/jobs/{job_id}/retry")
            assert response.status_code == 409
            assert response.get_json()["error"]["code"] == "conflict"
            asked = client.post(f"/api/jobs/{job_id}/cancel")
            assert asked.status_code == 202
            assert asked.get_json()["state"] == "running"
            assert asked.get_json()["cancel_requested_at"] is not None
            assert "finishes normally" in asked.get_json()["message"]
            RELEASE[key].set()
            proj.jobs.testing.wait_for(lambda: in_state(client, job_id, State.SUCCEEDED))
    finally:
        RELEASE[key].set()
    assert client.post(f"/api/jobs/{job_id}/retry").status_code == 409
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 409
    assert RUNS[job_id] == 1


def test_cancelled_job_never_runs(
    client: FlaskClient, purged: Celery, task_log: BufferingHandler
) -> None:
    """A queued job cancelled through the API is 200 and ``cancelled``; its
    message, delivered to a worker, is skipped; it cannot be cancelled twice."""
    key = uuid.uuid4().hex
    RUNNING[key], RELEASE[key] = threading.Event(), threading.Event()
    RELEASE[key].set()
    job_id = wait.apply_async_on_commit((key,))

    response = client.post(f"/api/jobs/{job_id}/cancel")

    assert response.status_code == 200
    assert response.get_json()["state"] == "cancelled"
    assert response.get_json()["finished_at"] is not None
    skipped = f"tests.jobs.wait[{job_id}]: job is cancelled; skipping this delivery"
    with proj.jobs.testing.worker(purged):
        proj.jobs.testing.wait_for(lambda: skipped in {r.getMessage() for r in task_log.buffer})
    assert job_id not in RUNS and not RUNNING[key].is_set()
    after = get_job(client, job_id)
    assert (after["state"], after["attempts"], after["started_at"]) == ("cancelled", 0, None)
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 409


def test_failed_job_is_retried(client: FlaskClient, purged: Celery) -> None:
    """A failed job retried through the API is 202 and ``queued``, then runs
    again (its attempts grow) and succeeds."""
    email = new_email()
    job_id = fails_once.apply_async_on_commit((email,))
    with proj.jobs.testing.worker(purged):
        failed = proj.jobs.testing.wait_for(lambda: in_state(client, job_id, State.FAILED))
        assert failed["attempts"] == 1 and "failing the first time" in failed["error"]

        response = client.post(f"/api/jobs/{job_id}/retry")

        assert response.status_code == 202
        assert response.get_json()["state"] == "queued"
        done = proj.jobs.testing.wait_for(lambda: in_state(client, job_id, State.SUCCEEDED))
    assert done["attempts"] == 2 and done["result"] == email
    assert RUNS[job_id] == 2 and signed_up(email)


def test_failed_jobs_are_listed_in_pages(client: FlaskClient) -> None:
    """GET /api/jobs?state=failed&limit=2 lists failed jobs newest first, two
    a page, and its ``next`` link leads through every one of them once."""
    mine = [str(uuid.uuid4()) for _ in range(3)]
    for job_id in mine:
        record_failure(
            worker_engine(), job_id=job_id, name="tests.jobs.listed", error="listed as failed"
        )

    seen: list[str] = []
    url: str | None = "/api/jobs?state=failed&limit=2"
    while url is not None and not set(mine) <= set(seen):
        response = client.get(url)
        assert response.status_code == 200
        page = response.get_json()
        assert 1 <= len(page["jobs"]) <= 2
        assert {job["state"] for job in page["jobs"]} == {"failed"}
        seen += [job["id"] for job in page["jobs"]]
        url = page["next"]

    assert len(seen) == len(set(seen)), "a job was listed twice"
    assert [job_id for job_id in seen if job_id in mine] == mine[::-1]


@pytest.mark.parametrize(
    "query",
    [
        "state=nope",
        "state=FAILED",
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=501",
        "limit=2.5",
        "limit=²",
    ],
)
def test_invalid_listing_queries_are_400(client: FlaskClient, query: str) -> None:
    """An unknown state or a limit that is not 1 to 500 is a 400 JSON error."""
    response = client.get(f"/api/jobs?{query}")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_query"
