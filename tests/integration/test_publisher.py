"""``publisher.send`` builds a job's message itself (``send_direct``) unless it
has an ETA or an expiry, where Celery's ``send_task`` (``send_with_celery``)
took a third of the relay's time. On every broker, the message it puts on the
queue is the one ``send_task`` puts there: headers, properties, body, exchange
and routing key, for plain jobs, jobs with their own queue and priority, tasks
with execution options of their own, tasks this process does not know, and a
retry's next attempt published from inside the attempt before."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from celery._state import _task_stack  # type: ignore[attr-defined]  # as Celery's tracer

from proj.jobs import context, publisher, shared_task
from proj.jobs.metrics import PUBLISHED_HEADER

QUEUE = f"tests.publisher.{uuid.uuid4().hex}"
"""The queue the cases publish to, besides the default one."""


@shared_task(name="tests.publisher.plain", ignore_result=True)
def plain(user_id: int) -> int:
    return user_id


@shared_task(
    name="tests.publisher.configured", time_limit=30, soft_time_limit=20, serializer="json"
)
def configured(user_id: int) -> int:
    return user_id


@shared_task(name="tests.publisher.expiring", expires=600)
def expiring(user_id: int) -> int:
    return user_id


def message(name: str, options: dict[str, Any], retries: int = 0) -> dict[str, Any]:
    """A job's message, as the relay makes it from the job's row."""
    return publisher.job_message(
        {
            "id": str(uuid.uuid4()),
            "name": name,
            "args": [7, "seven", {"nested": [1.5, None]}],
            "kwargs": {"note": "x" * 2000},
            "options": options,
            "attempts": retries,
            "context": {
                "tenant": "acme",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            },
        }
    )


def seen(received: Any) -> dict[str, Any]:
    """What a consumer is given of a message, less what the broker numbers and
    the moment it was published (a timestamp, checked to be there)."""
    headers = dict(received.headers)
    assert isinstance(headers.pop(PUBLISHED_HEADER), float)
    properties = {k: v for k, v in received.properties.items() if k != "delivery_tag"}
    properties.pop("application_headers", None)  # the headers, on RabbitMQ
    if isinstance(properties.get("delivery_info"), dict):
        properties["delivery_info"] = {
            k: v for k, v in properties["delivery_info"].items() if k in ("exchange", "routing_key")
        }
    return {
        "headers": headers,
        "properties": properties,
        "body": received.decode(),
        "content_type": received.content_type,
        "content_encoding": received.content_encoding,
        "exchange": received.delivery_info.get("exchange"),
        "routing_key": received.delivery_info.get("routing_key"),
    }


def published(
    celery_app: Celery, queue: str, job: dict[str, Any], sending: Callable[..., None]
) -> dict[str, Any]:
    """Publish ``job`` with ``sending`` and take its message off ``queue``."""
    with celery_app.connection_for_write() as connection:
        # As the app declares it (a priority queue on RabbitMQ).
        declared = celery_app.amqp.queues[queue](connection.default_channel)
        declared.declare()
        declared.purge()
        with celery_app.producer_or_acquire() as producer:
            sending(celery_app, job, producer)
        for _ in range(200):  # Redis and SQLite deliver a moment later
            received = declared.get(no_ack=True)
            if received is not None:
                return seen(received)
            time.sleep(0.01)
    raise AssertionError(f"nothing arrived on {queue}")


def with_celery(celery_app: Celery, job: dict[str, Any], producer: Any) -> None:
    """What ``publisher.send`` did before it built messages itself: as
    ``apply_async`` sends, the task's own options (its time limits…) under
    the job's."""
    options = {
        **publisher.task_options(celery_app.tasks.get(job["name"])),
        **publisher.publish_options(job),
    }
    with context.restored(job["context"]):
        publisher.send_with_celery(celery_app, job, producer, options)


@contextmanager
def running_attempt(celery_app: Celery) -> Iterator[None]:
    """As inside a worker's run of ``plain`` (a retry publishes from there)."""
    task = celery_app.tasks["tests.publisher.plain"]
    task.push_request(
        id="attempt-1",
        root_id="root-0",
        called_directly=False,
        delivery_info={"priority": 4},
    )
    _task_stack.push(task)
    try:
        yield
    finally:
        _task_stack.pop()
        task.pop_request()


CASES: dict[str, tuple[str, dict[str, Any], int, str | None]] = {
    # case: task, the job's options, attempts made, the queue it goes to (None: the default)
    "plain": ("tests.publisher.plain", {}, 0, None),
    "its own queue and priority": (
        "tests.publisher.plain",
        {"queue": QUEUE, "routing_key": QUEUE, "priority": 9},
        0,
        QUEUE,
    ),
    "task options": ("tests.publisher.configured", {"queue": QUEUE}, 0, QUEUE),
    "task options under the job's": (
        "tests.publisher.configured",
        {"queue": QUEUE, "priority": 1},
        2,
        QUEUE,
    ),
    "unknown task": ("tests.publisher.elsewhere", {"queue": QUEUE}, 1, QUEUE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_message_is_send_tasks(celery_app: Celery, case: str) -> None:
    name, options, retries, queue = CASES[case]
    queue = queue or celery_app.conf.task_default_queue
    job = message(name, options, retries)
    expected = published(celery_app, queue, job, with_celery)
    found = published(celery_app, queue, job, publisher.send)
    assert found == expected
    assert found["headers"]["id"] == job["id"]
    assert found["headers"][publisher.JOB_HEADER] is True


def test_direct_message_in_a_running_attempt_is_send_tasks(celery_app: Celery) -> None:
    """Parent and root ids (and, where configured, the parent's priority) come
    from the attempt that publishes the next one."""
    celery_app.conf.task_inherit_parent_priority = True
    try:
        job = message("tests.publisher.plain", {"queue": QUEUE}, 1)
        with running_attempt(celery_app):
            expected = published(celery_app, QUEUE, job, with_celery)
            found = published(celery_app, QUEUE, job, publisher.send)
    finally:
        celery_app.conf.task_inherit_parent_priority = False
    assert found == expected
    assert (found["headers"]["parent_id"], found["headers"]["root_id"]) == ("attempt-1", "root-0")


def test_an_expiring_task_goes_through_celery(celery_app: Celery) -> None:
    """A task's own ``expires`` becomes the message's TTL, as Celery makes it."""
    job = message("tests.publisher.expiring", {"queue": QUEUE})
    found = published(celery_app, QUEUE, job, publisher.send)
    assert found["headers"]["expires"] is not None
    if celery_app.connection_for_write().transport.driver_type == "amqp":
        assert 599 <= float(found["properties"]["expiration"]) / 1000 <= 600
