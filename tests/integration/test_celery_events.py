"""proj's own cancel, as Celery's event stream (what Flower and ``celery
events`` read) tells it: a ``task-revoked`` event for a waiting job cancelled
through the job API, and for a running one when it stops as asked."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import redis
from celery import Celery
from flask.testing import FlaskClient

import proj.jobs.testing
from proj.jobs import SqlAlchemyTask, State, shared_task

if TYPE_CHECKING:
    from conftest import Stack

STARTED: dict[str, threading.Event] = {}


@shared_task(name="tests.events.patient", bind=True)
def patient(self: SqlAlchemyTask, key: str) -> None:
    """Check every 50 ms whether to stop (for up to 30 s)."""
    STARTED[key].set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        self.check_cancelled()
        time.sleep(0.05)


@shared_task(name="tests.events.nothing")
def nothing() -> None:
    """Do nothing."""


def revoked_events(celery_app: Celery, action: Callable[[], object], job_id: str) -> list[str]:
    """The ids of the ``task-revoked`` events sent while ``action`` runs and
    up to 10 s after, until one names ``job_id``: read with Celery's event
    receiver on RabbitMQ; on Redis, where kombu's receiver stops listening at
    once with redis-py 8, from the Redis channel Celery publishes them on."""
    url = str(celery_app.conf.broker_url)
    if url.startswith("redis"):
        return _revoked_on_redis(url, action, job_id)
    seen: list[str] = []
    with celery_app.connection_for_read() as connection:
        receiver = celery_app.events.Receiver(
            connection, handlers={"task-revoked": lambda event: seen.append(event["uuid"])}
        )
        with receiver.consumer_context(wakeup=False):
            action()
            deadline = time.monotonic() + 10
            while job_id not in seen and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)
    return seen


def _revoked_on_redis(url: str, action: Callable[[], object], job_id: str) -> list[str]:
    client = redis.Redis.from_url(url)
    database = client.connection_pool.connection_kwargs.get("db", 0)
    listening = client.pubsub(ignore_subscribe_messages=True)
    listening.psubscribe(f"/{database}.celeryev/task.revoked")
    seen: list[str] = []
    try:
        action()
        deadline = time.monotonic() + 10
        while job_id not in seen and time.monotonic() < deadline:
            message = listening.get_message(timeout=0.5)
            if message is not None:
                envelope = json.loads(message["data"])  # kombu's: the body is base64
                seen.append(json.loads(base64.b64decode(envelope["body"]))["uuid"])
    finally:
        listening.close()
        client.close()
    return seen


@pytest.fixture
def broadcasting(stack: Stack, purged: Celery) -> Celery:
    """The stack's app, where its broker carries events (not the SQLite one)."""
    if stack.settings.embedded:
        pytest.skip("the embedded SQLite broker carries no events")
    return purged


def test_a_waiting_job_cancelled_through_the_api_is_revoked_for_celery(
    broadcasting: Celery, client: FlaskClient
) -> None:
    job_id = nothing.apply_async_on_commit(countdown=60)

    def cancel() -> None:
        assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200

    assert job_id in revoked_events(broadcasting, cancel, job_id)


def test_a_running_job_that_stops_when_asked_is_revoked_for_celery(
    stack: Stack, broadcasting: Celery, client: FlaskClient
) -> None:
    if not stack.on_postgres:
        pytest.skip("SQLite has one writer: the job's open write would hold the cancel up")
    key = uuid.uuid4().hex
    STARTED[key] = threading.Event()
    job_id = patient.apply_async_on_commit((key,))
    with proj.jobs.testing.worker(broadcasting, pool="threads", concurrency=2):
        assert STARTED[key].wait(timeout=30)

        def cancel() -> None:
            assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 202

        seen = revoked_events(broadcasting, cancel, job_id)
        proj.jobs.testing.wait_for_state(job_id, State.CANCELLED, timeout=10)
    assert job_id in seen
