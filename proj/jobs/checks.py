"""Configurations proj refuses to run with, checked at start-up (worker and
beat, connected by ``Jobs``) and at enqueue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery

from proj.jobs.clock import due_at, utcnow
from proj.jobs.engine import resolve_result_backend
from proj.jobs.errors import ConfigurationError
from proj.jobs.registry import jobs_of

REDIS_DEFAULT_VISIBILITY_TIMEOUT = 3600.0


def visibility_timeout(celery_app: Celery) -> float | None:
    """Seconds before Redis redelivers an unacknowledged message; None elsewhere."""
    url = str(celery_app.conf.broker_url or "")
    if not url.startswith(("redis:", "rediss:")):
        return None
    options = celery_app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_TIMEOUT))


def unacked_limit(celery_app: Celery) -> tuple[float, str] | None:
    """How long the broker lets a worker hold a message unacknowledged, and
    what sets it: Redis's visibility timeout (then it delivers the message
    again), RabbitMQ's ``consumer_timeout`` (then it closes the channel and
    delivers everything the channel held again); None elsewhere."""
    redis = visibility_timeout(celery_app)
    if redis is not None:
        return redis, (
            "Redis redelivers unacknowledged messages after its visibility timeout; "
            "raise it (the broker's visibility_timeout transport option, "
            "PROJ_VISIBILITY_TIMEOUT in the reference application)"
        )
    if str(celery_app.conf.broker_url or "").startswith(("amqp:", "amqps:", "pyamqp:")):
        limit = jobs_of(celery_app).settings.rabbitmq_consumer_timeout
        if limit:
            return limit, (
                "RabbitMQ closes a channel that holds a message unacknowledged past its "
                "consumer_timeout; raise consumer_timeout on the server and "
                "PROJ_RABBITMQ_CONSUMER_TIMEOUT with it"
            )
    return None


def check_configuration(celery_app: Celery) -> None:
    """Refuse a configuration proj cannot keep its promises with.

    - only JSON crosses the queue (pickle would run whatever a message says);
    - a database result backend's URL names a driver that is installed;
    - on Redis, the visibility timeout, and on RabbitMQ the consumer timeout,
      must outlast every task's hard time limit: a worker holds a message
      unacknowledged while it runs, and past that limit the broker delivers
      it again. (Delays are checked where they are made: a ledger job's wait
      in its row, whatever its length; see :func:`check_countdown` for the
      others.)
    """
    conf = celery_app.conf
    for name in ("accept_content", "result_accept_content"):
        if set(conf[name] or ()) - {"json", "application/json"}:
            raise ConfigurationError(
                f"{name} = {conf[name]!r}: proj accepts JSON only; remove the others."
            )
    if isinstance(conf.result_backend, str):
        try:
            resolve_result_backend(conf.result_backend)
        except ConfigurationError as exc:
            raise ConfigurationError(f"result_backend (CELERY_RESULT_BACKEND): {exc}") from None
    found = unacked_limit(celery_app)
    if found is None:
        return
    limit, remedy = found
    celery_app.loader.import_default_modules()
    for task in celery_app.tasks.values():
        hard = task.time_limit or conf.task_time_limit
        if hard and hard >= limit:
            raise ConfigurationError(
                f"{task.name} may run for {hard:g} s (its hard time limit), but "
                f"{remedy} above the longest time limit ({limit:g} s now)."
            )


def check_countdown(celery_app: Celery, options: Mapping[str, Any]) -> None:
    """Refuse a countdown or ETA (of a plain ``apply_async``, or a plain
    task's retry) that the broker would cut short by redelivering: a worker
    holds such a message unacknowledged until it is due. A ledger job's wait
    is its row's, and never comes here."""
    delay = _delay(options)
    found = unacked_limit(celery_app)
    if delay is None or found is None:
        return
    limit, remedy = found
    if delay >= limit:
        raise ConfigurationError(
            f"a delay of {delay:g} s is not shorter than the broker allows a message "
            f"to wait unacknowledged ({limit:g} s): it would be delivered twice. "
            "Enqueue it with apply_async_on_commit (the ledger holds a delay of any "
            f"length) or shorten the delay; else: {remedy}."
        )


def _delay(options: Mapping[str, Any]) -> float | None:
    now = utcnow()
    eta = due_at(options, now)
    return None if eta is None else (eta - now).total_seconds()
