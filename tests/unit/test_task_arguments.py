"""Task arguments are checked at enqueue time (no services: kombu's in-memory broker)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy.orm import make_transient_to_detached

from proj.jobs import Jobs, SqlAlchemyTask, TaskArgumentError
from proj.jobs.arguments import check_arguments
from proj.models import User


def detached_user(user_id: int) -> User:
    """A User as a finished session leaves it: detached, with its identity."""
    user = User(id=user_id, email=f"{user_id}@example.com")
    make_transient_to_detached(user)
    return user


@pytest.fixture
def memory_app() -> Iterator[Celery[Any]]:
    """A Celery app on kombu's in-memory broker, with one SqlAlchemyTask."""
    app = Celery("unit", broker="memory://", task_cls=SqlAlchemyTask, set_as_current=False)
    Jobs(app, database_url="sqlite://")

    @app.task(name="unit.echo", shared=False)
    def echo(value: Any) -> Any:
        return value

    yield app
    app.close()


def published(app: Celery, queue_name: str) -> list[Any]:
    """The argument lists of the messages waiting in ``queue_name`` (consumed)."""
    queue = app.amqp.queues[queue_name]
    found = []
    with app.connection_for_write() as connection:
        bound = queue(connection.default_channel)
        bound.declare()
        while (message := bound.get(no_ack=True)) is not None:
            found.append(message.decode()[0])
        bound.delete()
    return found


def test_orm_object_is_refused_with_its_id() -> None:
    """The error names the object, its id, and says to pass the id."""
    with pytest.raises(TaskArgumentError) as caught:
        check_arguments("t", (detached_user(42),), None)
    message = str(caught.value)
    assert "got a User object (id 42)" in message
    assert "pass the object's id" in message


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((User(email="new@example.com"),), None),
        ((1, [2, {"deep": (detached_user(3),)}]), None),
        ((), {"users": {"first": detached_user(4)}}),
        ((), {"ids": {detached_user(5)}}),
    ],
    ids=["new-object", "nested-in-args", "nested-in-kwargs", "in-a-set"],
)
def test_orm_object_is_found_wherever_it_hides(args: Any, kwargs: Any) -> None:
    """An ORM object anywhere in the arguments is refused."""
    with pytest.raises(TaskArgumentError, match="got a User object"):
        check_arguments("t", args, kwargs)


def test_circular_argument_is_refused_not_a_crash() -> None:
    """An argument that contains itself is a TaskArgumentError, not a RecursionError."""
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(TaskArgumentError, match="an argument contains itself"):
        check_arguments("t", (loop,), None)
    shared = [1]
    check_arguments("t", (shared, shared, {"again": shared}), None)  # repeated, not circular


def test_enqueue_refuses_bad_arguments_and_publishes_nothing(memory_app: Celery) -> None:
    """apply_async and delay refuse ORM objects and non-JSON values before publishing;
    JSON values are published as they are, so the queue shows what got through."""
    echo = memory_app.tasks["unit.echo"]
    queue = f"unit.{uuid.uuid4().hex}"
    with pytest.raises(TaskArgumentError, match="pass the object's id"):
        echo.apply_async((detached_user(7),), queue=queue)
    with pytest.raises(TaskArgumentError, match="pass the object's id"):
        echo.s(detached_user(7)).set(queue=queue).delay()
    with pytest.raises(TaskArgumentError, match="pass the object's id"):
        echo.apply_async((object(),), queue=queue)
    values = {"ids": [1, 2], "name": "a", "ratio": 2.5, "none": None, "nested": {"ok": True}}
    echo.apply_async((values,), queue=queue)
    assert published(memory_app, queue) == [[values]]


def test_eager_apply_async_checks_arguments_too(memory_app: Celery) -> None:
    """With task_always_eager, the same arguments are refused before the task runs."""
    memory_app.conf.task_always_eager = True
    echo = memory_app.tasks["unit.echo"]
    with pytest.raises(TaskArgumentError, match="pass the object's id"):
        echo.apply_async((object(),))
    with pytest.raises(TaskArgumentError, match="got a User object"):
        echo.delay(detached_user(8))
    assert echo.delay({"id": 8}).get() == {"id": 8}
