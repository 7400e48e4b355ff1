"""Dead letters: messages a worker cannot run (not JSON, an unknown task, a
refused content type, no task header) end as ``failed`` ledger rows instead of
vanishing into a log; so does every task that finally fails (see
:mod:`proj.jobs.worker`)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery.worker.consumer import Consumer
from kombu.message import Message
from sqlalchemy import Engine

from proj.jobs.ledger import record_failure
from proj.jobs.registry import jobs_of

logger = logging.getLogger(__name__)

UNRUNNABLE = "unrunnable_message"
"""Key of a failed row's ``options`` holding the message it could not run."""
BODY_LIMIT = 10_000
"""Characters of a message body kept in its row."""


def message_arguments(message: Message) -> dict[str, Any]:
    """What a raw message held, for its row."""
    body = message.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    return {
        # A NUL kept in JSON makes PostgreSQL's ->> refuse the whole query.
        "body": str(body)[:BODY_LIMIT].replace("\x00", "\ufffd"),
        "content_type": message.content_type,
        "headers": message.headers,
    }


def record_message(
    engine: Engine, message: Message, reason: str, exc: BaseException | None
) -> None:
    """Record a message the worker drops without running it. Never raises."""
    headers = message.headers or {}
    job_id = str(headers.get("id") or f"dead-letter-{uuid.uuid4()}")
    name = str(headers.get("task", "?"))
    error = f"{reason} message: {exc!r}" if exc else f"{reason} message"
    try:
        record_failure(
            engine,
            job_id=job_id,
            name=name,
            error=error,
            options={UNRUNNABLE: {"reason": reason, **message_arguments(message)}},
        )
    except Exception:
        logger.exception("could not record %s message %s[%s]", reason, name, job_id)
    else:
        logger.warning("recorded %s message %s[%s] as a failed job", reason, name, job_id)


class RecordingConsumer(Consumer):
    """Celery's consumer, recording undecodable messages before it drops them."""

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        record_message(jobs_of(self.app).engine, message, "undecodable", exc)
        super().on_decode_error(message, exc)
