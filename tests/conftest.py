"""Fixtures for every tier: the stacks (real servers, set up and torn down per run)
and the leak detectors.

The stacks are ``stacks.py``'s: PostgreSQL + RabbitMQ, PostgreSQL + Redis
and the embedded SQLite setup, each made new for the run. A stack whose
servers do not answer is skipped, and the run's summary says so; with ``CI``
or ``PROJ_REQUIRE_SERVICES`` set, it fails instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import stacks
from celery import Celery
from celery._state import get_current_app
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import settings
from sqlalchemy import update

import proj.jobs.testing
from proj.celery import make_celery
from proj.config import Settings, load_settings, use_settings
from proj.jobs import Jobs, NotInstalledError, auth
from proj.jobs.models import Job, State
from proj.jobs.publisher import owed
from proj.jobs.testing import InMemoryQueue
from proj.migrations import upgrade

# Loaded by its entry point already; named for runs without plugin autoloading.
pytest_plugins = ["proj.jobs.testing.plugin"]

REQUIRED = bool(os.environ.get("CI") or os.environ.get("PROJ_REQUIRE_SERVICES"))
FLUSH_WAIT = 60.0
"""Seconds the leak check waits for the fast path's publishing thread."""

# Hypothesis (the property tests, and Schemathesis's fuzzing of the API) tries
# the same examples on every run, so CI fails or passes as it did here, and
# keeps no example database; `pytest --hypothesis-profile=thorough` looks
# twenty times further, with new examples each run.
settings.register_profile("proj", max_examples=50, deadline=None, derandomize=True, database=None)
settings.register_profile("thorough", max_examples=1000, deadline=None, database=None)
settings.load_profile("proj")

_skipped: dict[str, str] = {}


@dataclass
class Stack:
    """One stack, ready: its environment (for subprocesses) and settings."""

    name: str
    env: dict[str, str]
    data_dir: Path

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    @property
    def on_postgres(self) -> bool:
        return self.env.get("DATABASE_URL", "").startswith("postgresql")

    def process_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` with this stack's variables (for ``celery``, ``proj``…)."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PROJ_", "CELERY_")) and k != "DATABASE_URL"
        }
        return {**base, **self.env, **extra}


def _requested_stacks() -> tuple[str, ...]:
    wanted = os.environ.get("PROJ_TEST_STACKS")
    return tuple(s for s in stacks.STACKS if not wanted or s in wanted.split(","))


@pytest.fixture(scope="session", params=_requested_stacks())
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack with migrated, empty database, broker and data folder."""
    name = request.param
    problem = stacks.missing_services(name)
    if problem:
        _skipped[name] = problem
        if REQUIRED:
            pytest.fail(f"stack {name}: {problem} (services are required here)")
        pytest.skip(f"stack {name}: {problem}")
    data_dir = Path(tempfile.mkdtemp(prefix=f"proj-{name}-"))
    try:
        with stacks.stack(name, data_dir) as env:
            made = Stack(name, env, data_dir)
            upgrade(made.settings.database_url)
            yield made
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def celery_app(stack: Stack) -> Iterator[Celery]:
    """proj pointed at the stack: a Celery app for its broker with proj.jobs on
    its database, made current and default (shared tasks publish through it)."""
    use_settings(stack.settings)
    made = make_celery(stack.settings)
    made.set_current()
    made.set_default()
    yield made
    # Let go of the stack's database before it is dropped.
    Jobs.of(made).dispose()


@pytest.fixture
def app(stack: Stack, celery_app: Celery) -> Iterator[Flask]:
    """The Flask application on the stack (its pool closed afterwards)."""
    from proj.db import db as web_db
    from proj.web import create_app

    flask_app = create_app(stack.settings, celery_app)
    flask_app.testing = True
    # Each test's app counts its own sign-ins (they all come from 127.0.0.1);
    # test_console_auth tests the stores the stack shares.
    flask_app.config["PROJ_RATELIMIT_STORAGE_URI"] = "memory://"
    yield flask_app
    with flask_app.app_context():
        web_db.engine.dispose()


def api_token(app: Flask, role: str = "operator") -> str:
    """A new API token with ``role`` on ``app``'s database."""
    from proj.db import db as web_db

    with app.app_context():
        token = auth.add_token(web_db.session, f"test-{uuid.uuid4().hex[:12]}", role)
        web_db.session.commit()
    return token


@pytest.fixture
def make_token() -> Callable[..., str]:
    """:func:`api_token` for tests that make a Flask app of their own (a test
    module cannot import it: ``conftest`` names more than one module)."""
    return api_token


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client that sends an operator's API token."""
    made = app.test_client()
    made.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_token(app)}"
    return made


@pytest.fixture
def purged(celery_app: Celery) -> Celery:
    """The Celery app with its queues emptied first, and no job an earlier
    test left owed (due later, the relay would publish it in this test)."""
    celery_app.control.purge()
    with Jobs.of(celery_app).engine.begin() as connection:
        connection.execute(update(Job).where(*owed()).values(state=State.CANCELLED))
    return celery_app


@pytest.fixture
def memory(celery_app: Celery) -> Iterator[InMemoryQueue]:
    """Job messages recorded in memory instead of published."""
    with proj.jobs.testing.in_memory(celery_app) as queue:
        yield queue


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a session, an app context or a connection behind."""
    from flask import has_app_context

    yield
    assert not has_app_context(), "an application context was left pushed"
    try:
        jobs = Jobs.of(get_current_app())
    except NotInstalledError:
        return  # no stack in this test: nothing of proj.jobs to leak
    # A burst (the fuzzer's monthly reports fill the sender's whole backlog)
    # takes seconds to publish on a loaded machine; a leak never ends.
    assert jobs.flush(timeout=FLUSH_WAIT), "the fast path's publishing thread is still busy"
    assert not jobs.session.registry.has(), "a task session was left open"
    # An in-process worker's thread gives its run's connection back just after
    # the run's result is stored, which is what the test waited for: a leak
    # is a connection still out a moment later.
    try:
        proj.jobs.testing.wait_for(lambda: proj.jobs.testing.checked_out() == 0, timeout=2)
    except AssertionError:
        raise AssertionError("a worker connection is still checked out") from None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name, problem in _skipped.items():
        terminalreporter.write_line(
            f"SKIPPED stack {name} (integration and e2e tiers): {problem}", yellow=True
        )
