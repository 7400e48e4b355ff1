"""Long tasks travel on the ``long`` queue, and the reconciler looks for a
job's message where the routes send it."""

from __future__ import annotations

from celery import Celery

from proj.maintenance import queue_is_empty, queue_of
from proj.tasks import generate_report, send_welcome


def test_long_tasks_go_to_the_long_queue(purged: Celery) -> None:
    generate_report.delay(1)
    assert not queue_is_empty(purged, "long")
    assert queue_is_empty(purged, "celery")
    purged.control.purge()

    send_welcome.delay(1)
    assert queue_is_empty(purged, "long")
    assert not queue_is_empty(purged, "celery")
    purged.control.purge()


def test_the_reconciler_looks_where_the_routes_send(celery_app: Celery) -> None:
    assert queue_of(celery_app, generate_report.name, {}) == "long"
    assert queue_of(celery_app, send_welcome.name, None) == "celery"
    assert queue_of(celery_app, send_welcome.name, {"queue": "own"}) == "own"
