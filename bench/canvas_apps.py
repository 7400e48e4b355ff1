"""The canvas benchmark's apps (:mod:`bench.canvas`): plain Celery's and
proj's, each with the same two tasks (``celery -A bench.canvas_apps:baseline``
or ``:proj``), the table the last step writes, and the canvases they run."""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

from celery import Celery, Task, chain, chord
from celery.canvas import Signature
from sqlalchemy import Float, Integer, String, create_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from bench import stats, workload
from proj.jobs import SqlAlchemyTask

STEP, LAST = "bench.canvas.step", "bench.canvas.last"
CHAIN, CHORD = "chain of 3", "chord of 100"
CHORD_SIZE = 100


class Base(DeclarativeBase):
    """The declarative base of the benchmark's own table."""


class CanvasEnd(Base):
    """A run of a canvas's last step that committed (two rows: it ran twice)."""

    __tablename__ = "bench_canvas_ends"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    finished_at: Mapped[float] = mapped_column(Float)
    """Epoch seconds, taken in the step's transaction just before its commit."""


def touch(session: Session, user_id: int) -> None:
    """A step's body: the workload's transaction on ``user_id`` (the caller commits)."""
    now = time.time()
    workload.touch(session, user_id, now, now)


def finish(session: Session, user_id: int, key: str) -> None:
    """The last step's body: a step's, and the time its transaction commits at."""
    touch(session, user_id)
    session.add(CanvasEnd(key=key, finished_at=time.time()))


@cache
def baseline_app() -> Celery:
    """Plain Celery with the canvas tasks, the classic session recipe and a
    Redis result backend (``$CELERY_RESULT_BACKEND``, which ``celery worker``
    reads too)."""
    app = Celery(
        "bench-canvas",
        broker=os.environ["CELERY_BROKER_URL"],
        backend=os.environ["CELERY_RESULT_BACKEND"],
    )
    # A queue of its own, as bench.baseline's (proj's "celery" is a priority queue).
    app.conf.task_default_queue = "baseline-canvas"
    engine = create_engine(os.environ["DATABASE_URL"], pool_size=5)
    sessions = scoped_session(sessionmaker(bind=engine))
    stats.count_in_worker()

    class DatabaseTask(Task):  # type: ignore[type-arg]
        def after_return(self, *args: Any, **kwargs: Any) -> None:
            sessions.remove()

    @app.task(base=DatabaseTask, name=STEP)
    def step(given: object, user_id: int, key: str) -> str:
        touch(sessions(), user_id)
        sessions.commit()
        return key

    @app.task(base=DatabaseTask, name=LAST)
    def last(given: object, user_id: int, key: str) -> str:
        finish(sessions(), user_id, key)
        sessions.commit()
        return key

    return app


@cache
def proj_app() -> Celery:
    """proj's app (``celery -A proj``) with the canvas tasks on ``SqlAlchemyTask``."""
    from proj.celery import app

    stats.count_in_worker()

    @app.task(base=SqlAlchemyTask, bind=True, name=STEP)
    def step(self: SqlAlchemyTask, given: object, user_id: int, key: str) -> str:
        touch(self.session, user_id)
        return key

    @app.task(base=SqlAlchemyTask, bind=True, name=LAST)
    def last(self: SqlAlchemyTask, given: object, user_id: int, key: str) -> str:
        finish(self.session, user_id, key)
        return key

    return app


def __getattr__(name: str) -> Celery:
    # ``celery -A bench.canvas_apps:baseline`` finds the app as an attribute: made
    # when asked for, so that importing this module makes none.
    if name == "baseline":
        return baseline_app()
    if name == "proj":
        return proj_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def canvas_of(app: Celery, kind: str, users: list[int], key: str) -> Signature:
    """A chain of three steps on ``users``, or a chord of a step a user but
    the last, whose callback takes the last."""
    last = app.signature(LAST, (users[-1], key))
    if kind == CHORD:
        return chord([app.signature(STEP, (None, user, key)) for user in users[:-1]], last)
    return chain(
        app.signature(STEP, (None, users[0], key)), app.signature(STEP, (users[1], key)), last
    )
