"""Fixtures for every tier: the stacks (real servers, set up and torn down per run)
and the leak detectors.

A stack is where proj's database, broker and results live:

- ``pg-rabbit``: a fresh PostgreSQL database and a fresh RabbitMQ vhost;
- ``pg-redis``: a fresh PostgreSQL database and a Redis database of its own;
- ``sqlite``: the embedded setup in a temporary folder.

A stack whose servers do not answer is skipped, and the run's summary says so;
with ``CI`` or ``PROJ_REQUIRE_SERVICES`` set, it fails instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient

import proj.testing
from proj import db
from proj.config import Settings, load_settings
from proj.migrations import upgrade

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
RABBIT = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)
STACKS = ("pg-rabbit", "pg-redis", "sqlite")
REQUIRED = bool(os.environ.get("CI") or os.environ.get("PROJ_REQUIRE_SERVICES"))

_skipped: dict[str, str] = {}


@dataclass
class Stack:
    """One stack, ready: its environment (for subprocesses) and settings."""

    name: str
    env: dict[str, str]
    data_dir: Path
    cleanups: list[Any] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    @property
    def on_postgres(self) -> bool:
        return self.env["DATABASE_URL"].startswith("postgresql")

    def process_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` with this stack's variables (for ``celery``, ``proj``…)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PROJ_", "CELERY_"))}
        base.pop("DATABASE_URL", None)
        return {**base, **self.env, **extra}


def _reachable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
        return True
    except OSError:
        return False


def _missing(name: str) -> str | None:
    needs = {
        "pg-rabbit": [("PostgreSQL", (PG["host"], PG["port"])), ("RabbitMQ", RABBIT)],
        "pg-redis": [("PostgreSQL", (PG["host"], PG["port"])), ("Redis", REDIS)],
        "sqlite": [],
    }[name]
    down = [
        f"{what} at {host}:{port}" for what, (host, port) in needs if not _reachable((host, port))
    ]
    return ", ".join(down) + " not reachable" if down else None


def _create_pg_database(stack: Stack) -> str:
    name = f"proj_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(dbname="postgres", **PG)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    stack.cleanups.append(drop)
    return f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def _create_rabbit_vhost(stack: Stack) -> str:
    vhost = f"proj-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    stack.cleanups.append(lambda: _rabbitmqctl("delete_vhost", vhost))
    return f"amqp://guest:guest@{RABBIT[0]}:{RABBIT[1]}/{vhost}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _claim_redis_db(stack: Stack) -> str:
    admin = redis.Redis(*REDIS)
    for number in range(1, 16):
        lock = f"proj-test:redis-db:{number}"
        holder = admin.get(lock)
        if holder is not None and not _alive(int(holder)):
            admin.delete(lock)  # left by a run that was killed
        if admin.set(lock, os.getpid(), nx=True, ex=3 * 3600):
            client = redis.Redis(*REDIS, db=number)
            client.flushdb()

            def release(client: redis.Redis = client, lock: str = lock) -> None:
                client.flushdb()
                admin.delete(lock)

            stack.cleanups.append(release)
            return f"redis://{REDIS[0]}:{REDIS[1]}/{number}"
    raise RuntimeError("no free Redis database (1-15) for the tests")


def _build(name: str, data_dir: Path) -> Stack:
    stack = Stack(name, {"PROJ_DATA_DIR": str(data_dir)}, data_dir)
    if name == "sqlite":
        return stack
    database_url = _create_pg_database(stack)
    broker_url = _create_rabbit_vhost(stack) if name == "pg-rabbit" else _claim_redis_db(stack)
    stack.env.update(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=broker_url,
        CELERY_RESULT_BACKEND=f"db+{database_url}",
    )
    return stack


def _requested_stacks() -> tuple[str, ...]:
    wanted = os.environ.get("PROJ_TEST_STACKS")
    return tuple(s for s in STACKS if not wanted or s in wanted.split(","))


@pytest.fixture(scope="session", params=_requested_stacks())
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack with migrated, empty database, broker and data folder."""
    name = request.param
    problem = _missing(name)
    if problem:
        _skipped[name] = problem
        if REQUIRED:
            pytest.fail(f"stack {name}: {problem} (services are required here)")
        pytest.skip(f"stack {name}: {problem}")
    data_dir = Path(tempfile.mkdtemp(prefix=f"proj-{name}-"))
    built = _build(name, data_dir)
    try:
        upgrade(built.settings.database_url)
        yield built
    finally:
        db.configure(load_settings({"PROJ_DATA_DIR": str(data_dir)}))
        for cleanup in reversed(built.cleanups):
            cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def celery_app(stack: Stack) -> Celery:
    """proj pointed at the stack: its database and a Celery app for its broker."""
    return proj.testing.configure(stack.settings)


@pytest.fixture
def app(stack: Stack, celery_app: Celery) -> Iterator[Flask]:
    """The Flask application on the stack (its pool closed afterwards)."""
    from proj.web import create_app
    from proj.web.extensions import db as web_db

    flask_app = create_app(stack.settings, celery_app)
    flask_app.testing = True
    yield flask_app
    with flask_app.app_context():
        web_db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def purged(celery_app: Celery) -> Celery:
    """The Celery app with its default queue emptied first."""
    celery_app.control.purge()
    return celery_app


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a session, an app context or a connection behind."""
    from flask import has_app_context

    yield
    assert not db.Session.registry.has(), "a task session was left open"
    assert not has_app_context(), "an application context was left pushed"
    assert proj.testing.checked_out() == 0, "a worker connection is still checked out"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name, problem in _skipped.items():
        terminalreporter.write_line(
            f"SKIPPED stack {name} (integration and e2e tiers): {problem}", yellow=True
        )
