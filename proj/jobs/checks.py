"""Configurations proj refuses to run with, checked at start-up (worker and
beat, connected by ``Jobs``) and at enqueue."""

from __future__ import annotations

from typing import Any

from celery import Celery

from proj.jobs.clock import due_at, utcnow
from proj.jobs.errors import ConfigurationError
from proj.jobs.retry import retry_policy_of

REDIS_DEFAULT_VISIBILITY_TIMEOUT = 3600.0


def visibility_timeout(celery_app: Celery) -> float | None:
    """Seconds before Redis redelivers an unacknowledged message; None elsewhere."""
    url = str(celery_app.conf.broker_url or "")
    if not url.startswith(("redis:", "rediss:")):
        return None
    options = celery_app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_TIMEOUT))


def check_configuration(celery_app: Celery) -> None:
    """Refuse a configuration proj cannot keep its promises with.

    - only JSON crosses the queue (pickle would run whatever a message says);
    - on Redis, the visibility timeout must outlast every retry countdown,
      or a message waiting for its retry is delivered twice.
    """
    conf = celery_app.conf
    for name in ("accept_content", "result_accept_content"):
        if set(conf[name] or ()) - {"json", "application/json"}:
            raise ConfigurationError(
                f"{name} = {conf[name]!r}: proj accepts JSON only; remove the others."
            )
    limit = visibility_timeout(celery_app)
    if limit is None:
        return
    celery_app.loader.import_default_modules()
    for task in celery_app.tasks.values():
        policy = retry_policy_of(task)
        if policy is not None and policy.max_backoff >= limit:
            raise ConfigurationError(
                f"{task.name} may wait {policy.max_backoff:g} s before a retry, but "
                f"Redis redelivers unacknowledged messages after {limit:g} s; raise "
                "the broker's visibility_timeout transport option (PROJ_VISIBILITY_TIMEOUT "
                "in the reference application) above the longest countdown."
            )


def check_countdown(celery_app: Celery, options: dict[str, Any]) -> None:
    """Refuse a countdown or ETA that Redis would cut short by redelivering."""
    delay = _delay(options)
    if delay is None:
        return
    limit = visibility_timeout(celery_app)
    if limit is not None and delay >= limit:
        raise ConfigurationError(
            f"a delay of {delay:g} s is not shorter than Redis's visibility timeout "
            f"({limit:g} s): the message would be delivered twice. Raise "
            "PROJ_VISIBILITY_TIMEOUT or shorten the countdown."
        )


def _delay(options: dict[str, Any]) -> float | None:
    now = utcnow()
    eta = due_at(options, now)
    return None if eta is None else (eta - now).total_seconds()
