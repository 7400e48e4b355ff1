"""Dead letters: messages a worker cannot run (not JSON, an unknown task, a
refused content type, no task header) end as ``failed`` ledger rows instead of
vanishing into a log; so does every task that finally fails (see
:mod:`proj.jobs.worker`).

A dead letter is always a row of its own (``dead-letter-<uuid>``): the task
id its message quotes is kept in the row (:data:`QUOTED`), never used to
find a job to fail, since a mangled or forged message may quote any job. Its
tenant is the quoted job's, if there is one, else the one its header
carries."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery.worker.consumer import Consumer
from kombu.message import Message
from sqlalchemy import Engine, select

from proj.jobs import context
from proj.jobs.ledger import record_failure
from proj.jobs.models import Job
from proj.jobs.registry import jobs_of

logger = logging.getLogger(__name__)

UNRUNNABLE = "unrunnable_message"
"""Key of a failed row's ``options`` holding the message it could not run."""
BODY_LIMIT = 10_000
"""Characters of a message body kept in its row."""
QUOTED = "quoted_job_id"
"""Key, in a dead letter's :data:`UNRUNNABLE`, of the task id its message quoted."""


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
    """Record a message the worker drops without running it, as a row of its
    own (see the module). Never raises."""
    headers = message.headers or {}
    job_id = f"dead-letter-{uuid.uuid4()}"
    quoted = headers.get("id")
    name = str(headers.get("task", "?"))
    error = f"{reason} message: {exc!r}" if exc else f"{reason} message"
    unrunnable = {"reason": reason, QUOTED: quoted, **message_arguments(message)}
    try:
        record_failure(
            engine,
            job_id=job_id,
            name=name,
            error=error,
            options={UNRUNNABLE: unrunnable},
            tenant=_tenant_of(engine, quoted, headers),
        )
    except Exception:
        logger.exception("could not record %s message %s[%s]", reason, name, quoted)
    else:
        logger.warning(
            "recorded %s message %s[%s] as the failed job %s", reason, name, quoted, job_id
        )


def _tenant_of(engine: Engine, quoted: Any, headers: dict[str, Any]) -> str | None:
    """The quoted job's tenant if there is such a job, else the header's."""
    if quoted:
        with engine.connect() as connection:
            context.scope_system(connection)  # whichever tenant's job it names
            found = connection.execute(select(Job.tenant).where(Job.id == str(quoted))).first()
        if found is not None:
            tenant: str | None = found.tenant
            return tenant
    carried = headers.get(context.HEADER)
    said = carried.get("tenant") if isinstance(carried, dict) else None
    return said if isinstance(said, str) else None


class RecordingConsumer(Consumer):
    """Celery's consumer, recording undecodable messages before it drops them."""

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        record_message(jobs_of(self.app).engine, message, "undecodable", exc)
        super().on_decode_error(message, exc)
