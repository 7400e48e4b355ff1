"""The reference application's tasks (stable names under ``proj.tasks``).

Each one takes ids, loads what it needs in its own session, and logs and ends
without retrying when the id names nothing, or something of another tenant
than the job's (:func:`proj.models.get_for_tenant`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from celery.utils.log import get_task_logger
from sqlalchemy import func, select

from proj.config import current_settings
from proj.db import Session, worker_engine
from proj.jobs import (
    TRANSIENT_ERRORS,
    Job,
    Jobs,
    SqlAlchemyTask,
    State,
    retry_on,
    shared_task,
    utcnow,
)
from proj.mail import send_mail
from proj.models import Invoice, User, get_for_tenant
from proj.payments import default_gateway

logger = get_task_logger(__name__)

REPORT_CHUNK = 100
"""Invoices between two progress reports."""


@shared_task(name="proj.tasks.send_welcome")
@retry_on(TRANSIENT_ERRORS, max_retries=8)
def send_welcome(user_id: int) -> str | None:
    """Send the welcome mail and set ``welcomed_at``; once per user."""
    user = get_for_tenant(Session, User, user_id)
    if user is None:
        logger.warning("send_welcome: no user with id %r; nothing sent", user_id)
        return None
    if user.welcomed_at is not None:
        logger.info("send_welcome: user %s was welcomed already", user_id)
        return user.email
    send_mail(
        to=user.email,
        subject="Welcome!",
        body=f"Hello {user.email},\n\nyour account is ready.\n",
    )
    user.welcomed_at = utcnow()
    return user.email


# A caller of a plain delay() may wait for the charge id, and see the charge
# running: this task stores its result and its start (most tasks need neither).
@shared_task(name="proj.tasks.charge_invoice", ignore_result=False, track_started=True)
@retry_on(TRANSIENT_ERRORS, max_retries=8)
def charge_invoice(invoice_id: int) -> str | None:
    """Charge the invoice through the gateway; however often it runs, once."""
    invoice = get_for_tenant(Session, Invoice, invoice_id, with_for_update=True)
    if invoice is None:
        logger.warning("charge_invoice: no invoice with id %r; nothing charged", invoice_id)
        return None
    if invoice.status == "charged":
        logger.info("charge_invoice: invoice %s was charged already", invoice_id)
        return invoice.charge_id
    receipt = default_gateway().charge(
        idempotency_key=invoice.idempotency_key, amount_cents=invoice.amount_cents
    )
    invoice.status = "charged"
    invoice.charge_id = receipt.charge_id
    invoice.charged_at = receipt.created_at
    return receipt.charge_id


@shared_task(name="proj.tasks.send_receipt")
@retry_on(TRANSIENT_ERRORS, max_retries=8)
def send_receipt(charge_id: str | None, invoice_id: int) -> str | None:
    """Mail the receipt of the invoice's charge, the step chained after
    ``charge_invoice`` (whose result, the charge id, comes first); once."""
    invoice = get_for_tenant(Session, Invoice, invoice_id, with_for_update=True)
    if invoice is None or charge_id is None or invoice.status != "charged":
        logger.warning("send_receipt: invoice %r has no charge; no receipt", invoice_id)
        return None
    if invoice.receipt_sent_at is not None:
        logger.info("send_receipt: the receipt of invoice %s was sent already", invoice_id)
        return charge_id
    user = Session.get(User, invoice.user_id)
    send_mail(
        to=user.email if user else current_settings().digest_to,
        subject=f"Receipt for invoice {invoice.id}",
        body=f"We charged {invoice.amount_cents / 100:.2f} (charge {charge_id}).\n",
    )
    invoice.receipt_sent_at = utcnow()
    return charge_id


@shared_task(name="proj.tasks.generate_report", bind=True)
@retry_on(TRANSIENT_ERRORS)
def generate_report(self: SqlAlchemyTask, user_id: int) -> dict[str, int] | None:
    """Sum up a user's invoices, reporting progress as it goes."""
    if get_for_tenant(Session, User, user_id) is None:
        logger.warning("generate_report: no user with id %r; nothing to report", user_id)
        return None
    total = _count(select(func.count(Invoice.id)).where(Invoice.user_id == user_id))
    report = {"user_id": user_id, "invoices": 0, "charged": 0, "total_cents": 0, "charged_cents": 0}
    query = select(Invoice).where(Invoice.user_id == user_id).order_by(Invoice.id)
    for invoice in Session.scalars(query.execution_options(yield_per=REPORT_CHUNK)):
        report["invoices"] += 1
        report["total_cents"] += invoice.amount_cents
        if invoice.status == "charged":
            report["charged"] += 1
            report["charged_cents"] += invoice.amount_cents
        if report["invoices"] % REPORT_CHUNK == 0:
            self.set_progress(100.0 * report["invoices"] / total)
    return report


@shared_task(name="proj.tasks.mail_monthly_report")
@retry_on(TRANSIENT_ERRORS, max_retries=8)
def mail_monthly_report(reports: list[dict[str, int] | None], month: str) -> dict[str, int]:
    """The callback of the monthly report's chord: every user's report (in
    the chord's order; None for a user gone since) summed up and mailed to
    the operators."""
    summed = {"users": 0, "invoices": 0, "charged": 0, "total_cents": 0, "charged_cents": 0}
    for report in filter(None, reports):
        summed["users"] += 1
        for key in ("invoices", "charged", "total_cents", "charged_cents"):
            summed[key] += report[key]
    lines = "".join(f"{name}: {value}\n" for name, value in summed.items())
    send_mail(to=current_settings().digest_to, subject=f"proj report for {month}", body=lines)
    return summed


@shared_task(name="proj.tasks.cleanup_expired", bind=True)
@retry_on(TRANSIENT_ERRORS)
def cleanup_expired(self: SqlAlchemyTask) -> int:
    """Delete finished jobs, and audit entries, older than the retention
    period; return how many jobs."""
    deleted = Jobs.of(self.app).prune()  # in batches, each committed on its own
    logger.info("cleanup_expired: deleted %d finished jobs", deleted)
    return deleted


@shared_task(name="proj.tasks.send_digest")
@retry_on(TRANSIENT_ERRORS)
def send_digest() -> dict[str, int]:
    """Mail the operators what happened since the last digest period began."""
    settings = current_settings()
    since = utcnow() - timedelta(seconds=settings.digest_interval)
    counts = {
        "signups": _count(select(func.count(User.id)).where(User.created_at >= since)),
        "charges": _count(select(func.count(Invoice.id)).where(Invoice.charged_at >= since)),
        "failed_jobs": _count(
            select(func.count(Job.id)).where(Job.state == State.FAILED, Job.finished_at >= since)
        ),
    }
    lines = "".join(f"{name}: {value}\n" for name, value in counts.items())
    send_mail(to=settings.digest_to, subject="proj digest", body=f"Since {since:%c}:\n{lines}")
    return counts


def _count(query: Any) -> int:
    return int(Session.scalar(query) or 0)


@shared_task(name="proj.tasks.pool_status", ignore_result=False)
def pool_status() -> dict[str, Any]:
    """Which process answered, and how many of its worker connections are out
    (``checked_out``) and idle in its pool (``checked_in``).

    Uses no session itself, so the counts are what earlier runs left behind.
    """
    pool: Any = worker_engine().pool
    return {
        "pid": os.getpid(),
        "checked_out": pool.checkedout() if hasattr(pool, "checkedout") else 0,
        "checked_in": pool.checkedin() if hasattr(pool, "checkedin") else 0,
        "status": pool.status(),
    }
