"""A shop: a small Flask + Flask-SQLAlchemy + Celery application that adopts
proj.jobs as proj's tutorial shows, and nothing else of proj.

It has its own declarative base and tables (``orders``), its own Alembic
history (the ledger's ``jobs`` table has one of its own), a view that enqueues
in its request's transaction, and tasks that run in the Flask app's context.

``make_shop`` builds a new Flask app, Celery app and ``Jobs`` each time it is
called (tests need one per database and broker). An application with one
deployment would write the same lines at module level: ``celery_app = ...``,
``jobs = Jobs(...)``, ``@celery_app.task`` on module-level functions.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from flask import Flask, Response, current_app, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Integer, MetaData, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import proj.jobs.api
from proj.jobs import (
    TRANSIENT_ERRORS,
    Jobs,
    SqlAlchemyTask,
    UtcDateTime,
    engine_options,
    retry_on,
    utcnow,
)

UNPAID_FOR = timedelta(days=1)
"""How long an order may wait for its payment before ``expire_unpaid`` expires it."""
WEB_POOL_SIZE = 5


class ShopBase(DeclarativeBase):
    """The shop's declarative base: its own metadata, so ``metadata.create_all``
    and the shop's migrations know the shop's tables only."""

    metadata = MetaData()


db = SQLAlchemy(model_class=ShopBase)


class Order(ShopBase):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class OrderRefused(Exception):
    """The view refuses an order after enqueuing its payment: the request's
    transaction rolls back, so the payment job is never run."""


def make_shop(database_url: str, broker_url: str) -> tuple[Flask, Celery, Jobs]:
    """The shop's Flask app, Celery app and proj.jobs installation, on one
    database and one broker."""
    # Celery: JSON only, late acks (proj.jobs refuses pickle), one periodic task.
    celery_app = Celery("shop", broker=broker_url, set_as_current=False)
    celery_app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
        beat_schedule={
            "expire-unpaid": {"task": "shop.expire_unpaid", "schedule": timedelta(hours=1)},
        },
    )
    jobs = Jobs(celery_app, database_url=database_url)

    # Flask and Flask-SQLAlchemy, then proj.jobs on them.
    flask_app = Flask("shop")
    flask_app.config.update(
        SHOP_CURRENCY="EUR",
        # With the driver proj ships: a postgresql:// URL names none.
        SQLALCHEMY_DATABASE_URI=jobs.database_url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(jobs.database_url, WEB_POOL_SIZE),
    )
    db.init_app(flask_app)
    jobs.init_app(flask_app, db)
    flask_app.register_blueprint(proj.jobs.api.blueprint, url_prefix="/api/jobs")

    # Tasks. ``shared=False``: they belong to this Celery app only (a shared
    # task would be added to every Celery app made afterwards).
    @celery_app.task(base=SqlAlchemyTask, bind=True, name="shop.pay", shared=False)
    @retry_on(TRANSIENT_ERRORS, max_retries=5)
    def pay(self: SqlAlchemyTask, order_id: int) -> dict[str, Any] | None:
        """Mark the order paid (through ``db.session``: inside a task, the
        run's own session, committed when the run succeeds)."""
        order = db.session.get(Order, order_id)
        if order is None:
            return None
        order.status = "paid"
        order.paid_at = utcnow()
        return {
            "app": current_app.name,
            "currency": current_app.config["SHOP_CURRENCY"],
            "runs_own_session": db.session() is self.session,
        }

    @celery_app.task(base=SqlAlchemyTask, name="shop.expire_unpaid", shared=False)
    def expire_unpaid() -> int:
        """Periodic: expire the orders left unpaid for :data:`UNPAID_FOR`."""
        cutoff = utcnow() - UNPAID_FOR
        stale = select(Order).where(Order.status == "pending", Order.created_at < cutoff)
        expired = db.session.scalars(stale).all()
        for order in expired:
            order.status = "expired"
        return len(expired)

    # Views.
    @flask_app.post("/orders")
    def create_order() -> tuple[Response, int, dict[str, str]]:
        """Take an order and enqueue its payment in the same transaction;
        ``{"fail": true}`` refuses it after the enqueue (nothing is paid)."""
        body = request.get_json(silent=True) or {}
        order = Order()
        db.session.add(order)
        db.session.flush()  # the order's id
        job_id = pay.delay_on_commit(order.id)
        if body.get("fail"):
            raise OrderRefused(f"order {order.id} refused as asked")
        db.session.commit()
        location = {"Location": f"/api/jobs/{job_id}"}
        return jsonify(order_id=order.id, job_id=job_id), 201, location

    @flask_app.errorhandler(OrderRefused)
    def refused(error: OrderRefused) -> tuple[Response, int]:
        db.session.rollback()
        return jsonify(error={"code": "refused", "message": str(error)}), 422

    return flask_app, celery_app, jobs
