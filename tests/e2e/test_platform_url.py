"""The reference application on a ``postgresql://`` URL as platforms hand it
out, with nothing else set but the secret key: web, worker, beat and relay
start, a sign-up gets its welcome mail, beat's entry runs through the ledger,
and a stored result is read back with ``celery result``. Then the same with
the result backend named as Celery's docs show it (``db+postgresql://``) and
a RabbitMQ broker.

SQLAlchemy 2.1 picks psycopg 3 for a URL that names no driver; proj ships
psycopg2, so every URL proj reads or derives must get it (the worker used to
die at start on the result backend's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psycopg2
import pytest
import stacks
from subprocesses import BIN, Commands, e2e_env

pytestmark = pytest.mark.e2e

REQUIRED = bool(os.environ.get("CI") or os.environ.get("PROJ_REQUIRE_SERVICES"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any proj, database or Celery setting, plus ``extra``."""
    prefixes = ("PROJ_", "DATABASE_", "CELERY_", "SECRET_KEY")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | extra


@pytest.fixture(params=["database-url-only", "result-backend-and-rabbitmq"])
def platform_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    needs = "postgres" if request.param == "database-url-only" else "pg-rabbit"
    problem = stacks.missing_services(needs)
    if problem:
        if REQUIRED:
            pytest.fail(problem)
        pytest.skip(problem)
    with ExitStack() as made:
        url = made.enter_context(stacks.postgres_database())
        assert url.startswith("postgresql://")
        env = clean_env(
            DATABASE_URL=url,
            SECRET_KEY=uuid.uuid4().hex * 2,
            PROJ_DATA_DIR=str(tmp_path / "data"),
            # beat's entry is due at once, so the test sees it run
            PROJ_CLEANUP_INTERVAL="2",
        )
        if request.param == "result-backend-and-rabbitmq":
            env["CELERY_RESULT_BACKEND"] = f"db+{url}"
            env["CELERY_BROKER_URL"] = made.enter_context(stacks.rabbitmq_vhost())
        yield env


def proj(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "proj"), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def celery(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "proj", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def post(url: str, token: str, body: dict[str, str]) -> dict[str, object]:
    curl = subprocess.run(
        [
            *("curl", "-sf", "-X", "POST", "-H", f"Authorization: Bearer {token}"),
            *("-H", "Content-Type: application/json", "-d", json.dumps(body), url),
        ],
        env={**os.environ, "no_proxy": "*", "NO_PROXY": "*"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert curl.returncode == 0, curl.stderr
    answer: dict[str, object] = json.loads(curl.stdout)
    return answer


def test_the_whole_application_runs_on_a_platform_url(
    platform_env: dict[str, str], commands: Commands
) -> None:
    env = platform_env
    proj(env, "db", "upgrade")
    token = proj(env, "token", "add", "e2e", "--role", "operator").splitlines()[-1]
    check = proj(env, "check")
    assert "postgresql+psycopg2://" in check

    _, web_url = commands.web(env)
    worker = commands.worker(env)
    beat = commands.celery("beat", "beat", "--loglevel=INFO", env=e2e_env(env))
    relay = commands.relay(env)
    beat.wait_for_output("Sending due task cleanup-expired")

    address = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    user = post(f"{web_url}/api/users", token, {"email": address})
    assert user["email"] == address
    mail = Path(env["PROJ_DATA_DIR"]) / "mail"
    worker.until(lambda: any(address in p.read_text() for p in mail.glob("*.eml")))

    ledger = psycopg2.connect(env["DATABASE_URL"])
    try:

        def cleanup_succeeded() -> bool:
            with ledger, ledger.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM jobs WHERE name = 'proj.tasks.cleanup_expired'"
                    " AND state = 'succeeded'"
                )
                (count,) = cursor.fetchone() or (0,)
                return bool(count)

        worker.until(cleanup_succeeded)
    finally:
        ledger.close()

    # A task that stores its result, read back through the result backend
    # (``celery result`` waits for it).
    task_id = celery(env, "call", "proj.tasks.pool_status").strip()
    assert re.search(r"'pid': \d+", celery(env, "result", task_id))

    for command in (worker, beat, relay):
        assert "Traceback" not in command.output(), command.output()[-3000:]
        assert "psycopg'" not in command.output()
