"""The in-memory testing mode, used as an adopter would use it: a small Flask +
Celery app of its own on SQLite, a broker nobody listens on, and the
``enqueued`` fixture of proj.jobs's pytest plugin (loaded in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from flask import Flask, abort, current_app, request
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

import proj.jobs.migrations
from proj.jobs import TRANSIENT_ERRORS, Job, Jobs, SqlAlchemyTask, retry_on
from proj.jobs.testing import (
    InMemoryQueue,
    assert_enqueued,
    enqueued_jobs,
    in_memory,
    refute_enqueued,
    run_enqueued,
)

db = SQLAlchemy()
FLAKY: list[int] = []
"""Note ids whose next publishing fails once with a transient error."""


class Note(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]
    published: Mapped[bool] = mapped_column(default=False)
    published_by: Mapped[str | None]


def create_app(data: Path) -> tuple[Flask, Celery]:
    """The notes app: a view that saves a note and publishes it in the background."""
    url = f"sqlite:///{data}/notes.sqlite3"
    # Port 9 answers nothing: the in-memory mode must never reach the broker.
    celery_app = Celery("notes", broker="amqp://guest@127.0.0.1:9//", set_as_current=False)
    flask_app = Flask("notes")
    flask_app.config.update(SQLALCHEMY_DATABASE_URI=url, NOTES_SIGNATURE="the notes app")
    db.init_app(flask_app)
    jobs = Jobs(celery_app, database_url=url)
    jobs.init_app(flask_app, db)

    @celery_app.task(base=SqlAlchemyTask, bind=True, name="notes.publish", shared=False)
    @retry_on(TRANSIENT_ERRORS, max_retries=3, backoff=0.01)
    def publish(self: SqlAlchemyTask, note_id: int) -> str:
        if note_id in FLAKY:
            FLAKY.remove(note_id)
            raise ConnectionError("the search index is restarting")
        note = db.session.get(Note, note_id)
        if note is None:
            raise LookupError(f"no note {note_id}")
        note.published = True
        note.published_by = current_app.config["NOTES_SIGNATURE"]
        if note.text.startswith("echo "):
            celery_app.tasks["notes.publish"].delay_on_commit(save(note.text[5:]))
        return note.text

    @flask_app.post("/notes")
    def create_note() -> tuple[dict[str, Any], int]:
        text = (request.get_json(silent=True) or {}).get("text")
        if not isinstance(text, str):
            abort(400)
        note_id = save(text)
        publish.delay_on_commit(note_id)
        if text == "rollback":
            db.session.rollback()
            abort(422)
        db.session.commit()
        return {"id": note_id}, 201

    with flask_app.app_context():
        db.create_all()
    proj.jobs.migrations.upgrade(url)
    return flask_app, celery_app


def save(text: str) -> int:
    note = Note(text=text)
    db.session.add(note)
    db.session.flush()
    return note.id


@pytest.fixture
def notes(tmp_path: Path) -> Iterator[tuple[Flask, Celery]]:
    flask_app, celery_app = create_app(tmp_path)
    yield flask_app, celery_app
    Jobs.of(celery_app).dispose()
    with flask_app.app_context():
        db.engine.dispose()


@pytest.fixture
def jobs_celery_app(notes: tuple[Flask, Celery]) -> Celery:
    return notes[1]


@pytest.fixture
def client(notes: tuple[Flask, Celery]) -> FlaskClient:
    return notes[0].test_client()


def note(flask_app: Flask, note_id: int) -> Note:
    with flask_app.app_context():
        found = db.session.get(Note, note_id)
        assert found is not None
        db.session.expunge(found)
        return found


def ledger_row(celery_app: Celery, job_id: str) -> Job:
    with Jobs.of(celery_app).session_scope() as session:
        found = session.get(Job, job_id)
        assert found is not None
        session.expunge(found)
        return found


def test_a_committed_view_enqueues_and_nothing_runs_yet(
    client: FlaskClient, notes: tuple[Flask, Celery], enqueued: InMemoryQueue
) -> None:
    note_id = client.post("/notes", json={"text": "hello"}).get_json()["id"]
    job = enqueued.assert_enqueued("notes.publish", args=[note_id])
    assert [j.id for j in enqueued.enqueued_jobs()] == [job.id]
    assert not note(notes[0], note_id).published
    row = ledger_row(notes[1], job.id)
    assert (row.state, row.published_at is not None) == ("queued", True)


def test_a_rolled_back_view_enqueues_nothing(client: FlaskClient, enqueued: InMemoryQueue) -> None:
    assert client.post("/notes", json={"text": "rollback"}).status_code == 422
    enqueued.refute_enqueued("notes.publish")
    assert enqueued.enqueued_jobs() == []
    with pytest.raises(AssertionError, match="no job"):
        enqueued.assert_enqueued("notes.publish")


def test_run_enqueued_runs_with_the_real_session_rules(
    client: FlaskClient, notes: tuple[Flask, Celery], enqueued: InMemoryQueue
) -> None:
    flask_app, celery_app = notes
    note_id = client.post("/notes", json={"text": "hello"}).get_json()["id"]
    [job] = enqueued.enqueued_jobs()
    assert enqueued.run_enqueued() == 1
    published = note(flask_app, note_id)
    assert (published.published, published.published_by) == (True, "the notes app")
    row = ledger_row(celery_app, job.id)
    assert (row.state, row.attempts, row.result) == ("succeeded", 1, "hello")
    assert enqueued.enqueued_jobs() == []


def test_a_retry_is_enqueued_again_and_run(
    client: FlaskClient, notes: tuple[Flask, Celery], enqueued: InMemoryQueue
) -> None:
    note_id = client.post("/notes", json={"text": "flaky"}).get_json()["id"]
    FLAKY.append(note_id)
    [job] = enqueued.enqueued_jobs()
    assert enqueued.run_enqueued() == 2  # the failed attempt, then its retry
    row = ledger_row(notes[1], job.id)
    assert (row.state, row.attempts) == ("succeeded", 2)


def test_a_failing_job_ends_failed_in_the_ledger(
    notes: tuple[Flask, Celery], enqueued: InMemoryQueue
) -> None:
    job_id = notes[1].tasks["notes.publish"].delay_on_commit(10**6)
    assert enqueued.run_enqueued() == 1
    row = ledger_row(notes[1], job_id)
    assert row.state == "failed"
    assert "no note 1000000" in (row.error or "")


def test_jobs_enqueued_by_jobs_run_too(
    client: FlaskClient, notes: tuple[Flask, Celery], enqueued: InMemoryQueue
) -> None:
    first = client.post("/notes", json={"text": "echo again"}).get_json()["id"]
    assert enqueued.run_enqueued() == 2
    assert note(notes[0], first).published
    assert note(notes[0], first + 1).published
    assert note(notes[0], first + 1).text == "again"


def test_the_module_functions_use_the_innermost_block(notes: tuple[Flask, Celery]) -> None:
    flask_app, celery_app = notes
    with in_memory(celery_app):
        client = flask_app.test_client()
        note_id = client.post("/notes", json={"text": "plain"}).get_json()["id"]
        assert_enqueued(celery_app.tasks["notes.publish"], args=[note_id])
        refute_enqueued("notes.publish", args=[note_id + 1])
        assert len(enqueued_jobs()) == 1
        assert run_enqueued() == 1
    assert Jobs.of(celery_app).capture is None
    with pytest.raises(AssertionError, match="no in-memory queue"):
        enqueued_jobs()
