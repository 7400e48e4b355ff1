"""Messages a worker cannot run are recorded as dead letters and dropped; the
worker keeps going and runs the good task queued behind them."""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import select

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import context
from proj.jobs.deadletter import QUOTED, UNRUNNABLE
from proj.jobs.models import Job, State
from proj.models import User
from proj.tasks import send_welcome


class MakesFolder:
    """Unpickling this creates a folder: evidence that a worker ran a pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


def publish_raw(
    celery_app: Celery,
    body: str | bytes,
    *,
    headers: dict[str, Any],
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
) -> None:
    """Put ``body`` on the default queue as it is, bypassing Celery's encoding."""
    queue = celery_app.amqp.queues["celery"]
    with celery_app.connection_for_write() as connection:
        connection.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers=headers,
            content_type=content_type,
            content_encoding=content_encoding,
        )


def queued(celery_app: Celery) -> list[str]:
    """What is left on the default queue (taken off it): each message's task
    id, or its body if it has none."""
    queue = celery_app.amqp.queues["celery"]
    left = []
    with celery_app.connection_for_write() as connection:
        bound = queue(connection.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            left.append(str((message.headers or {}).get("id") or message.body))
    return left


def task_headers(task: str, task_id: str) -> dict[str, Any]:
    return {"task": task, "id": task_id, "lang": "py"}


def letters(task_ids: list[str], marker: str) -> dict[str, tuple[str, str]]:
    """(reason, task name) of each dead letter quoting one of ``task_ids``, and
    of those quoting none whose message holds ``marker`` (keyed by ``marker``)."""
    with session_scope() as session:
        rows = session.scalars(
            select(Job).where(Job.state == State.FAILED, Job.id.like("dead-letter-%"))
        ).all()
        found: dict[str, tuple[str, str]] = {}
        for row in rows:
            message = (row.options or {}).get(UNRUNNABLE, {})
            quoted = message.get(QUOTED)
            key = quoted if quoted in task_ids else (marker if marker in str(message) else None)
            if key is not None:
                assert key not in found, f"{key} recorded twice"
                found[key] = (message.get("reason"), row.name)
        return found


def test_bad_messages_are_dead_lettered(purged: Celery, tmp_path: Path) -> None:
    """Undecodable, unknown-task, pickled and headerless messages each leave one
    dead letter and are dropped; the valid task behind them runs."""
    with session_scope() as session:
        user = User(email=f"malformed-{uuid.uuid4().hex[:12]}@example.com")
        session.add(user)
        session.flush()
        user_id = user.id
    undecodable, unknown, pickled = (str(uuid.uuid4()) for _ in range(3))
    marker = f"no-task-header-{uuid.uuid4().hex}"
    unpickled = tmp_path / "unpickled"
    publish_raw(
        purged, "{this is not json", headers=task_headers("proj.tasks.send_welcome", undecodable)
    )
    publish_raw(
        purged,
        '[[1], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
        headers=task_headers("proj.tasks.no_such_task", unknown),
    )
    publish_raw(
        purged,
        pickle.dumps(((MakesFolder(str(unpickled)),), {}, {})),
        headers=task_headers("proj.tasks.send_welcome", pickled),
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    publish_raw(purged, f'{{"marker": "{marker}"}}', headers={})
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        send_welcome.delay(user_id)

        def welcomed() -> bool:
            with session_scope() as session:
                return session.scalar(select(User.welcomed_at).filter_by(id=user_id)) is not None

        proj.jobs.testing.wait_for(welcomed)
        proj.jobs.testing.wait_for(
            lambda: len(letters([undecodable, unknown, pickled], marker)) == 4
        )
    assert letters([undecodable, unknown, pickled], marker) == {
        undecodable: ("undecodable", "proj.tasks.send_welcome"),
        unknown: ("unknown-task", "proj.tasks.no_such_task"),
        pickled: ("rejected", "proj.tasks.send_welcome"),
        marker: ("rejected", "?"),
    }
    assert not unpickled.exists(), "the worker unpickled a message"
    # None of the bad messages went back to the queue. (The good task's may
    # have: a late ack the stopping worker had not sent yet is a redelivery.)
    bad = {undecodable, unknown, pickled}
    assert [left for left in queued(purged) if left in bad or marker in left] == []


def test_a_dead_letter_quoting_a_job_leaves_that_job_alone(purged: Celery) -> None:
    """An undecodable message quoting the id of tenant A's waiting job (a
    mangled copy, or a forgery) is recorded as a dead letter of its own,
    naming that id and A's tenant; the job itself is not touched, and runs."""
    with session_scope() as session:
        user = User(email=f"quoted-{uuid.uuid4().hex[:12]}@example.com", tenant="acme")
        session.add(user)
        session.flush()
        user_id = user.id
    with context.tenant("acme"):
        job_id = send_welcome.apply_async_on_commit((user_id,), countdown=3)
    publish_raw(
        purged,
        "{this is not json",
        headers={
            **task_headers("proj.tasks.send_welcome", job_id),
            context.HEADER: {"tenant": "x"},
        },
    )
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(lambda: len(letters([job_id], uuid.uuid4().hex)) == 1)
        assert proj.jobs.testing.job(job_id).state != State.FAILED
        proj.jobs.testing.wait_for_state(job_id, State.SUCCEEDED, celery_app=purged)
    with session_scope() as session:
        letter = session.scalars(
            select(Job).where(Job.id.like("dead-letter-%"), Job.options.isnot(None))
        ).all()
        [mine] = [row for row in letter if (row.options or {})[UNRUNNABLE].get(QUOTED) == job_id]
        assert (mine.tenant, mine.state) == ("acme", State.FAILED)
