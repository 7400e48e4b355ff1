"""enqueue_many without services: what it refuses (before writing anything),
the options every job of a batch keeps, its one ``create`` span, and the
in-memory mode's record of a batch (kombu's in-memory broker, a SQLite
ledger in a temporary folder)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select
from sqlalchemy.orm import make_transient_to_detached

import proj.jobs.migrations
from proj.jobs import Job, Jobs, JobsSettings, SqlAlchemyTask, TaskArgumentError, tracing
from proj.jobs.testing import in_memory
from proj.models import User


@pytest.fixture
def add(tmp_path: Path) -> Iterator[SqlAlchemyTask]:
    """A task of an app on kombu's in-memory broker, with its ledger on SQLite
    and a 200-byte message limit."""
    url = f"sqlite:///{tmp_path}/ledger.sqlite3"
    proj.jobs.migrations.upgrade(url)
    app = Celery("unit", broker="memory://", set_as_current=False)
    Jobs(app, settings=JobsSettings(database_url=url, max_message_size=200))

    @app.task(base=SqlAlchemyTask, name="unit.add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    task = app.tasks["unit.add"]
    assert isinstance(task, SqlAlchemyTask)
    yield task
    Jobs.of(app).dispose()
    app.close()


def ledger_rows(task: SqlAlchemyTask) -> list[Job]:
    """Every job's row, detached."""
    with Jobs.of(task.app).session_scope() as session:
        found = list(session.scalars(select(Job)))
        session.expunge_all()
        return found


def detached_user(user_id: int) -> User:
    user = User(id=user_id, email=f"{user_id}@example.com")
    make_transient_to_detached(user)
    return user


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"unique": "nightly"}, "unique cannot go with enqueue_many"),
        ({"task_id": "chosen"}, "task_id cannot go with enqueue_many"),
        ({"link": "unit.add"}, "link cannot go on a single ledger job"),
        ({"link_error": "unit.add"}, "link_error cannot go on a single ledger job"),
        ({"chain": []}, "chain cannot go on a single ledger job"),
    ],
)
def test_options_a_batch_cannot_keep_are_refused(
    add: SqlAlchemyTask, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(TaskArgumentError, match=named):
        add.enqueue_many([(1, 2)], **options)
    assert ledger_rows(add) == []


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ((detached_user(7), 1), r"got a User object \(id 7\)"),
        ((object(), 1), "is not JSON serializable"),
        (("x" * 300, 1), "more than PROJ_MAX_MESSAGE_SIZE"),
        ("ab", r"one sequence of positional arguments a job, as in \[\(1,\), \(2,\)\]"),
        (3, "got 3"),
    ],
    ids=["orm-object", "not-json", "too-large", "a-string", "a-number"],
)
def test_one_bad_call_refuses_the_whole_batch(add: SqlAlchemyTask, bad: Any, problem: str) -> None:
    with pytest.raises(TaskArgumentError, match=problem):
        add.enqueue_many([(1, 2), bad, (3, 4)])
    assert ledger_rows(add) == []


def test_options_apply_to_every_job_and_ids_come_in_order(add: SqlAlchemyTask) -> None:
    job_ids = add.enqueue_many(
        ((n, n) for n in range(3)), queue="sums", priority=3, expires=600, countdown=60
    )
    found = {job.id: job for job in ledger_rows(add)}
    assert [found[job_id].args for job_id in job_ids] == [[0, 0], [1, 1], [2, 2]]
    for job in found.values():
        assert (job.name, job.state, job.attempts) == ("unit.add", "queued", 0)
        assert job.options == {"queue": "sums", "priority": 3, "expires": 600}
        assert job.available_at >= job.created_at + timedelta(seconds=59)
        assert job.published_at is None


def test_an_empty_batch_writes_nothing(add: SqlAlchemyTask) -> None:
    assert add.enqueue_many([]) == []
    assert ledger_rows(add) == []


def test_the_in_memory_mode_records_a_batch_and_runs_it(add: SqlAlchemyTask) -> None:
    with in_memory(add.app) as queue:
        job_ids = add.enqueue_many([(1, 2), (3, 4)], queue="sums")
        recorded = queue.enqueued_jobs(add)
        assert [(job.id, job.args, job.options) for job in recorded] == [
            (job_ids[0], [1, 2], {"queue": "sums"}),
            (job_ids[1], [3, 4], {"queue": "sums"}),
        ]
        assert queue.run_enqueued() == 2
    found = {job.id: job for job in ledger_rows(add)}
    assert [(found[i].state, found[i].result) for i in job_ids] == [
        ("succeeded", 3),
        ("succeeded", 7),
    ]


def test_a_batch_is_one_create_span_whose_context_every_row_keeps(add: SqlAlchemyTask) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.enable(provider) is provider
    try:
        add.enqueue_many([(1, 2), (3, 4), (5, 6)])
    finally:
        tracing.disable()
        provider.shutdown()
    [create] = [span for span in exporter.get_finished_spans() if span.name == "create unit.add"]
    attributes = dict(create.attributes or {})
    assert attributes["messaging.batch.message_count"] == 3
    assert "messaging.message.id" not in attributes
    assert create.context is not None
    ids = f"{create.context.trace_id:032x}-{create.context.span_id:016x}"
    kept = [(job.context or {}).get("traceparent", "")[3:-3] for job in ledger_rows(add)]
    assert kept == [ids] * 3
