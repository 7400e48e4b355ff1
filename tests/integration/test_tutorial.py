"""The tutorial (``docs/tutorial/adopt.rst``), run as written: its code blocks
saved as ``shop.py`` and driven in a process of its own, on a new PostgreSQL
database (its URL in the ``postgresql://`` form platforms hand out) and a new
RabbitMQ vhost, after the ``proj`` commands the tutorial gives with it
(``proj jobs upgrade``, ``proj token add``, ``proj admin add``)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import stacks
from doc_examples import TUTORIAL, console_commands, tutorial_shop

PROJ = Path(sys.executable).parent / "proj"
REQUIRED = bool(os.environ.get("CI") or os.environ.get("PROJ_REQUIRE_SERVICES"))

DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import shop
from proj.jobs import testing

with shop.flask_app.app_context():
    shop.db.create_all()
client = shop.flask_app.test_client()
client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {sys.argv[2]}"
with testing.worker(shop.celery_app, pool="threads", concurrency=2):
    answer = client.post("/orders").get_json()
    testing.wait_for_state(answer["job"], "succeeded", celery_app=shop.celery_app)
job = client.get(f"/api/jobs/{answer['job']}").get_json()
browser = shop.flask_app.test_client()
without_token = browser.get(f"/api/jobs/{answer['job']}").status_code
console = [browser.get("/dashboard/").status_code, browser.get("/dashboard/login").status_code]
with shop.flask_app.app_context():
    status = shop.db.session.get(shop.Order, answer["order"]).status
    shop.db.engine.dispose()
print(json.dumps({
    "status": status, "state": job["state"], "result": job["result"],
    "without_token": without_token, "console": console,
}))
"""


def proj(env: dict[str, str], command: str, stdin: str = "") -> str:
    """``command`` (``proj ...``) as the tutorial gives it; its output."""
    done = subprocess.run(
        [str(PROJ), *shlex.split(command)[1:]],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    """The tutorial's shop: its order is paid by its job, whose state the job
    API answers with the token ``proj token add`` printed, and without a token
    refuses."""
    commands = console_commands(TUTORIAL, "proj")
    assert commands == [
        "proj jobs upgrade",
        "proj token add ops --role viewer",
        "proj admin add you@example.com --role operator",
    ], "the test feeds each command what it asks for: say what changed"
    problem = stacks.missing_services("pg-rabbit")
    if problem:
        if REQUIRED:
            pytest.fail(problem)
        pytest.skip(problem)
    (tmp_path / "shop.py").write_text(tutorial_shop())
    with stacks.postgres_database() as url, stacks.rabbitmq_vhost() as broker:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PROJ_", "CELERY_"))},
            "DATABASE_URL": url.replace("postgresql+psycopg2://", "postgresql://"),
            "CELERY_BROKER_URL": broker,
            "SECRET_KEY": "a-long-random-value-for-the-test",
        }
        upgrade, add_token, add_account = commands
        proj(env, upgrade)
        token = proj(env, add_token).splitlines()[-1]
        added = proj(env, add_account, stdin="pw-4-test\n")
        assert "you@example.com (operator) added" in added
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, str(tmp_path), token],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {
        "status": "paid",
        "state": "succeeded",
        "result": "paid",
        "without_token": 401,
        "console": [302, 200],
    }
