"""The JSON API: users, invoices and charges (every request with an API token).

A token with a tenant acts for that tenant: what it makes is the tenant's,
and another tenant's user or invoice is a 404, as one that does not exist
(row-level security on PostgreSQL, and the look-ups here everywhere).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import chord
from flask import Blueprint, Response, jsonify, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import BadRequest

from proj.db import db
from proj.jobs import enqueue_on_commit
from proj.jobs.auth import require_token
from proj.jobs.context import current_tenant
from proj.models import MAX_ID, Invoice, User, get_for_tenant
from proj.tasks import (
    charge_invoice,
    generate_report,
    mail_monthly_report,
    send_receipt,
    send_welcome,
)
from proj.web.errors import ApiError

logger = logging.getLogger(__name__)

api = Blueprint("api", __name__, url_prefix="/api")
require_token(api)  # a viewer's token reads; writing needs an operator's

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
MAX_AMOUNT_CENTS = 10**9


def json_object() -> dict[str, Any]:
    """The request's JSON object body, or the 4xx that says what is wrong."""
    if not request.is_json:
        raise ApiError(
            415, "unsupported_media_type", "send a JSON body with Content-Type: application/json"
        )
    try:
        data = request.get_json()
    except (BadRequest, RecursionError):  # RecursionError: nested deeper than Python parses
        raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    return data


def invalid(fields: dict[str, str]) -> ApiError:
    return ApiError(400, "invalid_fields", "some fields are missing or not valid", fields)


def positive_int(data: dict[str, Any], name: str, maximum: int) -> int:
    value = data.get(name)
    if value is None:
        raise invalid({name: "required"})
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise invalid({name: f"must be a whole number from 1 to {maximum}"})
    return value


def visible(model: type[User] | type[Invoice], ident: int) -> Any:
    """The row if the request's tenant may see it, else None."""
    return get_for_tenant(db.session, model, ident) if ident <= MAX_ID else None


def get_or_404(model: type[User] | type[Invoice], ident: int) -> Any:
    found = visible(model, ident)
    if found is None:
        raise ApiError(404, "not_found", f"no {model.__tablename__[:-1]} with id {ident}")
    return found


@api.post("/users")
def create_user() -> tuple[Response, int, dict[str, str]]:
    data = json_object()
    email = data.get("email")
    if email is None:
        raise invalid({"email": "required"})
    # Printable too: no NUL (PostgreSQL refuses it in text), no lone surrogate (UTF-8 has none).
    if (
        not isinstance(email, str)
        or len(email) > 320
        or not EMAIL.match(email.strip())
        or not email.strip().isprintable()
    ):
        raise invalid({"email": "not a valid email address"})
    user = User(email=email.strip().lower())
    db.session.add(user)
    try:
        db.session.flush()
    except IntegrityError:
        db.session.rollback()
        raise ApiError(409, "conflict", f"{user.email} is already signed up") from None
    send_welcome.delay_on_commit(user.id)
    answer = user.to_json()  # as created: once committed, the welcome job may run at once
    db.session.commit()
    return jsonify(answer), 201, {"Location": url_for("api.get_user", user_id=answer["id"])}


@api.get("/users/<int:user_id>")
def get_user(user_id: int) -> Response:
    return jsonify(get_or_404(User, user_id).to_json())


@api.post("/invoices")
def create_invoice() -> tuple[Response, int, dict[str, str]]:
    data = json_object()
    user_id = positive_int(data, "user_id", MAX_ID)
    amount = positive_int(data, "amount_cents", MAX_AMOUNT_CENTS)
    if visible(User, user_id) is None:
        raise invalid({"user_id": f"no user with id {user_id}"})
    invoice = Invoice(user_id=user_id, amount_cents=amount)
    db.session.add(invoice)
    db.session.commit()
    location = url_for("api.get_invoice", invoice_id=invoice.id)
    return jsonify(invoice.to_json()), 201, {"Location": location}


@api.get("/invoices/<int:invoice_id>")
def get_invoice(invoice_id: int) -> Response:
    return jsonify(get_or_404(Invoice, invoice_id).to_json())


@api.post("/invoices/<int:invoice_id>/charge")
def charge(invoice_id: int) -> tuple[Response, int, dict[str, str]]:
    invoice = get_or_404(Invoice, invoice_id)
    # Asked again while a charge of this invoice waits or runs: the same job.
    # Its receipt follows it, as a step of a canvas: mailed once the charge
    # has committed, with the charge id it returned.
    job_id = charge_invoice.apply_async_on_commit(
        (invoice.id,), unique=invoice.idempotency_key, link=send_receipt.s(invoice.id)
    )
    db.session.commit()
    return accepted(job_id)


@api.post("/reports")
def create_report() -> tuple[Response, int, dict[str, str]]:
    data = json_object()
    user_id = positive_int(data, "user_id", MAX_ID)
    if visible(User, user_id) is None:
        raise invalid({"user_id": f"no user with id {user_id}"})
    job_id = generate_report.delay_on_commit(user_id)
    db.session.commit()
    return accepted(job_id)


@api.post("/reports/monthly")
def create_monthly_report() -> tuple[Response, int, dict[str, str]]:
    """Every user's report, then one mail summing them up: a chord, each
    report a job, the mail released once by the last of them."""
    month = json_object().get("month")
    if not isinstance(month, str) or not MONTH.fullmatch(month):
        raise invalid({"month": "must be a month as YYYY-MM"})
    tenant = current_tenant()
    owned = User.tenant.is_(None) if tenant is None else User.tenant == tenant
    user_ids = db.session.scalars(select(User.id).where(owned).order_by(User.id)).all()
    reports = [generate_report.s(user_id) for user_id in user_ids]
    canvas_id = enqueue_on_commit(chord(reports, mail_monthly_report.s(month)))
    db.session.commit()
    where = url_for("jobs.list_jobs", canvas=canvas_id)
    return jsonify(canvas_id=canvas_id), 202, {"Location": where}


def accepted(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """202 with the job's id, and where to follow it."""
    return jsonify(job_id=job_id), 202, {"Location": url_for("jobs.get_job", job_id=job_id)}
