"""The benchmark's workload, the same for every variant: 1,000 users, and a
task that selects one by id, bumps its counter and timestamp, and commits."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from celery.signals import worker_ready
from sqlalchemy import DateTime, Engine, Float, Integer, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

USERS = 1000


class Base(DeclarativeBase):
    pass


class BenchUser(Base):
    """A user the benchmark touches; its columns record what the tasks did."""

    __tablename__ = "bench_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    touches: Mapped[int] = mapped_column(Integer, default=0)
    first_touched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    touched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    """Enqueue to start of the last touch, in milliseconds."""


def touch(session: Session, user_id: int, enqueued_at: float, started_at: float) -> None:
    """The task body every variant runs (the caller commits)."""
    user = session.get(BenchUser, user_id)
    if user is None:
        return
    now = datetime.fromtimestamp(started_at).astimezone()
    user.touches += 1
    user.first_touched_at = user.first_touched_at or now
    user.touched_at = datetime.now().astimezone()
    user.latency_ms = (started_at - enqueued_at) * 1000


def announce_ready() -> None:
    """Touch ``$BENCH_READY_FILE`` when the worker is ready (the runner waits on it)."""

    @worker_ready.connect(weak=False)
    def ready(**_: object) -> None:
        path = os.environ.get("BENCH_READY_FILE")
        if path:
            Path(path).touch()


def reset(engine: Engine) -> None:
    """(Re)create the table with 1,000 untouched users."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(BenchUser(id=i, touches=0) for i in range(1, USERS + 1))
        session.commit()


def clear(engine: Engine) -> None:
    """Set every user back to untouched."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE bench_users SET touches = 0, first_touched_at = NULL,"
                " touched_at = NULL, latency_ms = NULL"
            )
        )


def touches(engine: Engine) -> dict[int, int]:
    """Each user's counter."""
    with Session(engine) as session:
        return dict(session.execute(select(BenchUser.id, BenchUser.touches)).tuples().all())


def drain_seconds(engine: Engine) -> float:
    """Seconds from the first task's start to the last task's commit."""
    with Session(engine) as session:
        first, last = session.execute(
            select(func.min(BenchUser.first_touched_at), func.max(BenchUser.touched_at))
        ).one()
    if first is None or last is None:
        raise RuntimeError("no task has run")
    return float((last - first).total_seconds())


def latencies(engine: Engine) -> list[float]:
    """Enqueue-to-start latencies recorded, in milliseconds."""
    with Session(engine) as session:
        query = select(BenchUser.latency_ms).where(BenchUser.latency_ms.is_not(None))
        return sorted(float(v) for v in session.scalars(query) if v is not None)
