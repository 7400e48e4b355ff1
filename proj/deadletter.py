"""Dead letters: every task that finally fails, and every message a worker
cannot run, is recorded here instead of vanishing into a log."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from celery.worker.consumer import Consumer
from kombu.message import Message
from sqlalchemy import JSON, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from proj.db import Base, UtcDateTime, session_scope, utcnow

logger = logging.getLogger(__name__)

BODY_LIMIT = 10_000
"""Characters of an undecodable body kept in its dead letter."""


class DeadLetter(Base):
    """A task run or message that failed for good."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(255))
    task_id: Mapped[str | None] = mapped_column(String(255), index=True)
    reason: Mapped[str] = mapped_column(String(32))
    """``failed`` (the task raised), ``undecodable``, ``unknown-task`` or ``rejected``."""
    arguments: Mapped[Any] = mapped_column(JSON)
    """``{"args", "kwargs"}``, or ``{"body", "content_type", "headers"}`` for a
    message that could not be read."""
    exception: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    failed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def record_dead_letter(
    *,
    task_name: str,
    task_id: str | None,
    reason: str,
    arguments: Any,
    exception: BaseException | str | None,
    traceback: str | None = None,
    attempts: int = 1,
) -> None:
    """Write a dead letter in its own transaction.

    Never raises: if the database cannot take it, the letter goes to the log.
    """
    text = exception if isinstance(exception, str) else repr(exception)
    try:
        with session_scope() as session:
            session.add(
                DeadLetter(
                    task_name=task_name,
                    task_id=task_id,
                    reason=reason,
                    arguments=_jsonable(arguments),
                    exception=text,
                    traceback=traceback,
                    attempts=attempts,
                )
            )
    except Exception:
        logger.exception(
            "could not record dead letter for %s[%s] (%s): %s", task_name, task_id, reason, text
        )
    else:
        logger.warning("dead letter: %s[%s] %s: %s", task_name, task_id, reason, text)


def message_arguments(message: Message) -> dict[str, Any]:
    """What a raw message held, for a dead letter."""
    body = message.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    return {
        "body": str(body)[:BODY_LIMIT],
        "content_type": message.content_type,
        "headers": message.headers,
    }


def record_message(message: Message, reason: str, exc: BaseException | None) -> None:
    """Record a message the worker rejects without running it."""
    headers = message.headers or {}
    record_dead_letter(
        task_name=str(headers.get("task", "?")),
        task_id=headers.get("id"),
        reason=reason,
        arguments=message_arguments(message),
        exception=exc or f"{reason} message",
    )


class RecordingConsumer(Consumer):
    """Celery's consumer, recording undecodable messages before it drops them."""

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        record_message(message, "undecodable", exc)
        super().on_decode_error(message, exc)
