"""The JSON API on a real stack: sign-up, invoices, charges and every error shape."""

from __future__ import annotations

import email
import email.policy
import uuid
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs.models import FINISHED, Job, State
from proj.models import MAX_ID, Invoice, User
from proj.payments import LedgerCharge
from proj.tasks import charge_invoice

if TYPE_CHECKING:
    from conftest import Stack


def new_email() -> str:
    return f"api-{uuid.uuid4().hex[:12]}@example.com"


def new_user() -> int:
    """A user made straight in the database (no welcome job enqueued)."""
    with session_scope() as session:
        user = User(email=new_email())
        session.add(user)
        session.flush()
        return user.id


def error_of(response: TestResponse, status: int) -> dict[str, Any]:
    """The ``error`` object of a JSON error response, its shape checked."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json, response.get_data(as_text=True)
    body = response.get_json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) in ({"code", "message"}, {"code", "message", "fields"})
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if "fields" in error:
        assert isinstance(error["fields"], dict) and error["fields"]
    return error


def mails_to(stack: Stack, address: str) -> list[EmailMessage]:
    folder = stack.data_dir / "mail"
    mails = [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        for path in sorted(folder.glob("*.eml"))
    ]
    return [mail for mail in mails if mail["To"] == address]  # type: ignore[misc]


def test_sign_up_welcomes_the_user(stack: Stack, purged: Celery, client: FlaskClient) -> None:
    """POST /api/users answers 201 with the user and its Location; the welcome
    job runs after the commit, sets welcomed_at and writes the mail."""
    address = new_email()
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        response = client.post("/api/users", json={"email": address.upper()})
        assert response.status_code == 201, response.get_data(as_text=True)
        created = response.get_json()
        assert created["email"] == address
        assert isinstance(created["id"], int)
        assert created["welcomed_at"] is None
        location = response.headers["Location"]
        assert location.endswith(f"/api/users/{created['id']}")

        def welcomed() -> dict[str, Any] | None:
            shown = client.get(location)
            assert shown.status_code == 200
            body: dict[str, Any] = shown.get_json()
            return body if body["welcomed_at"] else None

        shown = proj.jobs.testing.wait_for(welcomed)
    assert shown["id"] == created["id"] and shown["email"] == address
    mails = mails_to(stack, address)
    assert len(mails) == 1
    assert mails[0]["Subject"] == "Welcome!"


def test_duplicate_email_conflicts(client: FlaskClient) -> None:
    """Signing up an address twice (in any case) answers 409 the second time."""
    address = new_email()
    assert client.post("/api/users", json={"email": address}).status_code == 201
    error = error_of(client.post("/api/users", json={"email": address.upper()}), 409)
    assert error["code"] == "conflict"
    assert address in error["message"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({}, "required"),
        ({"email": None}, "required"),
        ({"email": 42}, "not a valid email address"),
        ({"email": ["a@example.com"]}, "not a valid email address"),
        ({"email": "no-at-sign.example.com"}, "not a valid email address"),
        ({"email": "a@b@example.com"}, "not a valid email address"),
        ({"email": "x" * 310 + "@example.com"}, "not a valid email address"),
    ],
    ids=["missing", "null", "number", "list", "no-at", "two-at", "too-long"],
)
def test_invalid_email_is_refused(client: FlaskClient, body: dict[str, Any], problem: str) -> None:
    """A missing or invalid email answers 400 naming the field; nothing is stored."""
    error = error_of(client.post("/api/users", json=body), 400)
    assert error["code"] == "invalid_fields"
    assert error["fields"] == {"email": problem}
    if isinstance(body.get("email"), str):
        with session_scope() as session:
            stored = session.scalar(select(User.id).filter_by(email=body["email"].lower()))
        assert stored is None


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"data": "email=a@example.com", "content_type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        (
            {"data": '{"email": "a@example.com"}', "content_type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        ({"data": '{"email": ', "content_type": "application/json"}, 400, "malformed_json"),
        ({"data": b'{"email": "\xff"}', "content_type": "application/json"}, 400, "malformed_json"),
        (
            {"data": "[" * 5000 + "]" * 5000, "content_type": "application/json"},
            400,
            "malformed_json",
        ),
        ({"json": ["a@example.com"]}, 400, "invalid_body"),
        ({"json": "a@example.com"}, 400, "invalid_body"),
        ({"data": "null", "content_type": "application/json"}, 400, "invalid_body"),
    ],
    ids=["form", "text", "truncated-json", "bad-utf8", "too-deep", "array", "string", "null"],
)
def test_bad_body_is_refused(
    client: FlaskClient, kwargs: dict[str, Any], status: int, code: str
) -> None:
    """A body that is not a JSON object gets the 4xx that says what is wrong."""
    for path in ("/api/users", "/api/invoices"):
        assert error_of(client.post(path, **kwargs), status)["code"] == code


def test_body_over_the_limit_is_refused(stack: Stack, client: FlaskClient) -> None:
    """A body larger than max_content_length answers 413 in the JSON shape."""
    limit = stack.settings.max_content_length
    address = "x" * limit + "@example.com"
    error = error_of(client.post("/api/users", json={"email": address}), 413)
    assert error["code"] == "request_entity_too_large"
    with session_scope() as session:
        assert session.scalar(select(User.id).filter_by(email=address)) is None


@pytest.mark.parametrize(
    "path",
    [
        "/api/users/abc",
        "/api/users/-1",
        "/api/users/0",
        "/api/users/1.5",
        f"/api/users/{MAX_ID}",
        f"/api/users/{MAX_ID + 1}",
        "/api/users/99999999999999999999",
        "/api/invoices/abc",
        "/api/invoices/99999999999999999999",
        f"/api/invoices/{MAX_ID}",
        "/api/nothing-here",
    ],
)
def test_unknown_or_malformed_id_is_404(client: FlaskClient, path: str) -> None:
    """An id that names nothing, or is not an id at all, answers 404 JSON, never 500."""
    assert error_of(client.get(path), 404)["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/api/users"), ("GET", "/api/invoices"), ("GET", "/api/invoices/1/charge")],
)
def test_wrong_method_is_405(client: FlaskClient, method: str, path: str) -> None:
    """A route asked with a method it does not serve answers 405 JSON."""
    response = client.open(path, method=method)
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_create_and_show_invoice(client: FlaskClient) -> None:
    """POST /api/invoices answers 201; GET shows it open and not charged."""
    user_id = new_user()
    response = client.post("/api/invoices", json={"user_id": user_id, "amount_cents": 1999})
    assert response.status_code == 201, response.get_data(as_text=True)
    created = response.get_json()
    assert created["user_id"] == user_id and created["amount_cents"] == 1999
    shown = client.get(response.headers["Location"])
    assert shown.status_code == 200
    assert shown.get_json() == created
    assert created["status"] == "open" and created["charged_at"] is None


@pytest.mark.parametrize(
    ("fields", "invalid"),
    [
        ({"amount_cents": 100}, "user_id"),
        ({"user_id": True, "amount_cents": 100}, "user_id"),
        ({"user_id": "1", "amount_cents": 100}, "user_id"),
        ({"user_id": 0, "amount_cents": 100}, "user_id"),
        ({"user_id": MAX_ID + 1, "amount_cents": 100}, "user_id"),
        ({"user_id": "mine"}, "amount_cents"),
        ({"user_id": "mine", "amount_cents": True}, "amount_cents"),
        ({"user_id": "mine", "amount_cents": "100"}, "amount_cents"),
        ({"user_id": "mine", "amount_cents": 0}, "amount_cents"),
        ({"user_id": "mine", "amount_cents": -5}, "amount_cents"),
        ({"user_id": "mine", "amount_cents": 1.5}, "amount_cents"),
        ({"user_id": "mine", "amount_cents": 10**9 + 1}, "amount_cents"),
        ({"user_id": MAX_ID, "amount_cents": 100}, "user_id"),
    ],
    ids=[
        "no-user",
        "user-bool",
        "user-string",
        "user-zero",
        "user-too-big",
        "no-amount",
        "amount-bool",
        "amount-string",
        "amount-zero",
        "amount-negative",
        "amount-float",
        "amount-too-big",
        "unknown-user",
    ],
)
def test_invalid_invoice_is_refused(
    client: FlaskClient, fields: dict[str, Any], invalid: str
) -> None:
    """A missing or invalid field, or an unknown user, answers 400 naming the field."""
    user_id = new_user()
    body = {name: user_id if value == "mine" else value for name, value in fields.items()}
    error = error_of(client.post("/api/invoices", json=body), 400)
    assert error["code"] == "invalid_fields"
    assert list(error["fields"]) == [invalid]
    with session_scope() as session:
        assert session.scalar(select(Invoice.id).filter_by(user_id=user_id)) is None


def job_states(client: FlaskClient, job_ids: list[str]) -> set[str]:
    """The jobs' states, as the job API shows them."""
    return {client.get(f"/api/jobs/{job_id}").get_json()["state"] for job_id in job_ids}


def test_charging_an_invoice_often_charges_it_once(purged: Celery, client: FlaskClient) -> None:
    """Five charge requests for one invoice while its charge waits answer one
    job (a unique job); five charge jobs of that invoice enqueued anyway (not
    unique), run two at a time, still make one gateway charge (its idempotency
    key); every job succeeds and the invoice shows it charged."""
    user_id = new_user()
    created = client.post("/api/invoices", json={"user_id": user_id, "amount_cents": 1250})
    assert created.status_code == 201
    invoice_id = created.get_json()["id"]
    jobs = []
    for _ in range(5):
        response = client.post(f"/api/invoices/{invoice_id}/charge")
        assert response.status_code == 202, response.get_data(as_text=True)
        jobs.append(response.get_json()["job_id"])
    assert len(set(jobs)) == 1
    jobs += [charge_invoice.delay_on_commit(invoice_id) for _ in range(4)]
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(lambda: job_states(client, jobs) <= set(FINISHED), timeout=60)
    assert job_states(client, jobs) == {State.SUCCEEDED}
    with session_scope() as session:
        query = select(LedgerCharge).filter_by(idempotency_key=f"invoice-{invoice_id}")
        charges = [(c.charge_id, c.amount_cents) for c in session.scalars(query)]
    assert len(charges) == 1
    assert charges[0][1] == 1250
    shown = client.get(f"/api/invoices/{invoice_id}").get_json()
    assert shown["status"] == "charged"
    assert shown["charged_at"] is not None
    assert shown["charge_id"] == charges[0][0]


def test_a_charge_mails_its_receipt_once_after_it(
    stack: Stack, purged: Celery, client: FlaskClient
) -> None:
    """The charge job's canvas: its receipt step, released by the charge's
    commit, mails the receipt naming the charge id the charge returned; a
    second charge request while the first waits adds no second receipt."""
    address = new_email()
    with session_scope() as session:
        user = User(email=address)
        session.add(user)
        session.flush()
        user_id = user.id
    created = client.post("/api/invoices", json={"user_id": user_id, "amount_cents": 990})
    invoice_id = created.get_json()["id"]
    job_ids = {client.post(f"/api/invoices/{invoice_id}/charge").get_json()["job_id"]}
    job_ids.add(client.post(f"/api/invoices/{invoice_id}/charge").get_json()["job_id"])
    [job_id] = job_ids
    charge_job = client.get(f"/api/jobs/{job_id}").get_json()
    [receipt_id] = charge_job["children"]
    assert client.get(f"/api/jobs/{receipt_id}").get_json()["state"] == State.WAITING
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for_state(receipt_id, State.SUCCEEDED, timeout=60)
    shown = client.get(f"/api/invoices/{invoice_id}").get_json()
    [receipt] = [mail for mail in mails_to(stack, address) if "Receipt" in str(mail["Subject"])]
    assert shown["charge_id"] in receipt.get_content()
    assert shown["receipt_sent_at"] is not None


def test_a_monthly_report_is_a_chord_over_the_users(
    stack: Stack, purged: Celery, client: FlaskClient
) -> None:
    """POST /api/reports/monthly: a report job a user, then one mail summing
    them, which gets every report in the users' order; a bad month is 400."""
    error_of(client.post("/api/reports/monthly", json={"month": "2026-13"}), 400)
    response = client.post("/api/reports/monthly", json={"month": "2026-11"})
    assert response.status_code == 202, response.get_data(as_text=True)
    canvas_id = response.get_json()["canvas_id"]
    listed = client.get(response.headers["Location"]).get_json()["jobs"]
    assert listed and {job["canvas_id"] for job in listed} == {canvas_id}
    with session_scope() as session:
        steps = list(session.scalars(select(Job).where(Job.canvas_id == canvas_id)))
        session.expunge_all()
    reports = [job for job in steps if job.name == "proj.tasks.generate_report"]
    [mail_job] = [job.to_json() for job in steps if job.name == "proj.tasks.mail_monthly_report"]
    assert sorted(mail_job["parents"]) == sorted(job.id for job in reports) and reports
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for_state(mail_job["id"], State.SUCCEEDED, timeout=120)
    done = client.get(f"/api/jobs/{mail_job['id']}").get_json()
    assert done["canvas_id"] == canvas_id
    assert done["result"]["users"] == len(reports)
    [given] = proj.jobs.testing.job(mail_job["id"]).args[:1]
    users = [report["user_id"] for report in given]
    assert users == sorted(users) == sorted(job.args[0] for job in reports)
    assert [mail["Subject"] for mail in mails_to(stack, stack.settings.digest_to)].count(
        "proj report for 2026-11"
    ) == 1


@pytest.mark.parametrize("invoice_id", ["0", str(MAX_ID), "99999999999999999999", "abc"])
def test_charging_an_unknown_invoice_is_404(
    purged: Celery, client: FlaskClient, invoice_id: str
) -> None:
    """Charging an invoice that does not exist answers 404 and enqueues nothing."""
    error = error_of(client.post(f"/api/invoices/{invoice_id}/charge"), 404)
    assert error["code"] == "not_found"
    queue = purged.amqp.queues["celery"]
    with purged.connection_for_write() as connection:
        assert queue(connection.default_channel).queue_declare().message_count == 0
