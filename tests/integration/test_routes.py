"""Long tasks travel on the ``long`` queue, every message lands in one queue,
and the reconciler looks for a job's message where the routes send it."""

from __future__ import annotations

from celery import Celery
from kombu import Connection

from proj.jobs.reconciler import empty_queues, queue_of
from proj.tasks import generate_report, send_welcome

QUEUES = ("celery", "long")
"""celeryconfig's queues (other tests add queues of their own to the app)."""


def declare_queues(celery_app: Celery, connection: Connection) -> None:
    """Declare and bind the queues on ``connection``, as a worker does when it starts."""
    for name in QUEUES:
        celery_app.amqp.queues[name](connection.default_channel).declare()


def holding(celery_app: Celery) -> set[str]:
    """The queues that hold a message."""
    return set(QUEUES) - empty_queues(celery_app, QUEUES)


def test_long_tasks_go_to_the_long_queue(purged: Celery) -> None:
    with purged.connection_for_write() as connection:
        declare_queues(purged, connection)
    generate_report.delay(1)
    assert holding(purged) == {"long"}
    purged.control.purge()

    send_welcome.delay(1)
    assert holding(purged) == {"celery"}
    purged.control.purge()


def test_a_message_sent_through_the_exchange_lands_in_one_queue(purged: Celery) -> None:
    """Other publishers address a queue by its exchange and routing key: no
    queue is bound with another's key (and would get copies of its messages)."""
    for name in QUEUES:
        queue = purged.amqp.queues[name]
        with purged.connection_for_write() as connection:
            # On the same connection: the embedded broker keeps bindings in memory.
            declare_queues(purged, connection)
            connection.Producer().publish(
                {"marker": name}, exchange=queue.exchange, routing_key=queue.routing_key
            )
        assert holding(purged) == {name}
        purged.control.purge()


def test_the_reconciler_looks_where_the_routes_send(celery_app: Celery) -> None:
    assert queue_of(celery_app, generate_report.name, {}) == "long"
    assert queue_of(celery_app, send_welcome.name, None) == "celery"
    assert queue_of(celery_app, send_welcome.name, {"queue": "own"}) == "own"
