"""The commands README and the documentation name, run as written: ``proj db
upgrade``, ``proj run`` (README's first command), the start-up refusal of
``celery -A proj worker`` and ``beat``, and docker-compose.yml's services."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import psycopg2
import pytest
import stacks
import yaml
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from subprocesses import BIN, WORKER_OPTIONS, Commands, free_port

from proj.config import DEFAULTS
from proj.jobs import auth
from proj.jobs.engine import resolve_url
from proj.jobs.migrations import alembic_config as jobs_alembic_config
from proj.jobs.models import LedgerBase
from proj.jobs.settings import DEFAULTS as JOBS_DEFAULTS
from proj.migrations import alembic_config

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"users", "invoices", "gateway_charges", "alembic_version"}
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


def readme() -> str:
    return (ROOT / "README.md").read_text()


def readme_first_block() -> list[str]:
    """The lines of README's first fenced code block."""
    return readme().split("```")[1].splitlines()[1:]


def readme_sign_up_line() -> str:
    """The ``curl`` line of README's second fenced code block (the sign-up)."""
    block = readme().split("```")[3].splitlines()[1:]
    return next(line for line in block if line.startswith("curl "))


def documented_commands() -> list[str]:
    """The commands the documentation's table of processes lists (the first
    column of the list table in ``docs/reference/cli.rst``)."""
    page = (ROOT / "docs" / "reference" / "cli.rst").read_text()
    return re.findall(r"^   \* - ``(.+)``$", page, re.MULTILINE)


def clean_env() -> dict[str, str]:
    """This environment without any proj, database or Celery setting."""
    prefixes = ("PROJ_", "DATABASE_", "CELERY_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def proj_db_upgrade(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "proj"), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )


def test_db_upgrade_twice_on_a_fresh_database(stack: Stack, tmp_path: Path) -> None:
    """``proj db upgrade`` creates proj's tables in an empty database, and
    running it again succeeds and changes nothing."""
    env = stack.process_env(PROJ_DATA_DIR=str(tmp_path / "data"))
    name = f"proj_e2e_{uuid.uuid4().hex[:10]}"
    url = f"sqlite:///{tmp_path / 'data' / 'proj.sqlite3'}"
    if stack.on_postgres:
        admin = psycopg2.connect(**PG_ADMIN)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
        env["DATABASE_URL"] = url
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = create_engine(url)
    try:
        for _ in range(2):
            done = proj_db_upgrade(env)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "is up to date" in done.stdout
            assert set(inspect(engine).get_table_names()) >= TABLES
            with engine.connect() as connection:
                versions = connection.execute(text("SELECT version_num FROM alembic_version"))
                assert versions.scalars().all() == [head]
            engine.dispose()
    finally:
        engine.dispose()
        if stack.on_postgres:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


def ledger_head() -> str | None:
    """The ledger's newest revision."""
    return ScriptDirectory.from_config(jobs_alembic_config()).get_current_head()


def test_jobs_upgrade_touches_only_the_ledger(tmp_path: Path) -> None:
    """``proj jobs upgrade`` (what an adopter runs) on a database that has its
    own tables and Alembic history, given as ``postgresql://``: the ledger's
    table and version table appear; the adopter's tables, ``alembic_version``
    and its row are left as they were; running it again changes nothing."""
    problem = stacks.missing_services("pg-rabbit")
    if problem and "PostgreSQL" in problem:
        pytest.skip(problem)
    with stacks.postgres_database() as url:
        engine = create_engine(resolve_url(url))
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE alembic_version (version_num varchar(32))"))
            connection.execute(text("INSERT INTO alembic_version VALUES ('adopter_0042')"))
            connection.execute(text("CREATE TABLE orders (id integer PRIMARY KEY)"))
        env = {**clean_env(), "DATABASE_URL": url}
        try:
            for _ in range(2):
                done = subprocess.run(
                    [str(BIN / "proj"), "jobs", "upgrade"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                assert "job ledger" in done.stdout and "is up to date" in done.stdout
                assert set(inspect(engine).get_table_names()) == {
                    "alembic_version",
                    "orders",
                    *ledger_tables(),
                    "proj_jobs_alembic_version",
                }
                with engine.connect() as connection:
                    adopter = connection.execute(text("SELECT version_num FROM alembic_version"))
                    assert adopter.scalars().all() == ["adopter_0042"]
                    ledger = text("SELECT version_num FROM proj_jobs_alembic_version")
                    assert connection.execute(ledger).scalars().all() == [ledger_head()]
                engine.dispose()
        finally:
            engine.dispose()


def ledger_tables() -> set[str]:
    """The tables of the ledger's models: ``proj.jobs.models``' and
    ``proj.jobs.auth``'s (imported here, as the ledger's migrations import it)."""
    tables = set(LedgerBase.metadata.tables)
    assert {"jobs", auth.Account.__tablename__, auth.ApiToken.__tablename__} <= tables
    return tables


def http(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """A real HTTP request (no proxy) with API token ``token``; the status and
    the JSON answer."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method=method,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return response.status, json.load(response)


@pytest.mark.parametrize("ctrl_c", ["proj", "process-group"])
def test_readme_first_command_runs_proj(commands: Commands, tmp_path: Path, ctrl_c: str) -> None:
    """README's first command installs what CI installs and runs ``proj run``,
    which, with nothing configured, serves the API and prints an API token
    with which README's ``curl`` signs a user up, welcomes the user by mail
    into ./proj-data/mail, and stops web, worker and beat on Ctrl-C, whether
    the signal reaches proj alone (as from ``kill -INT``) or its whole process
    group (as from a terminal)."""
    run_line, test_line = readme_first_block()[:2]
    install, run = run_line.rsplit(" && ", 1)
    assert install == test_line.rsplit(" && ", 1)[0]
    assert run.endswith("proj run")

    # A data folder some earlier tool left readable by all: proj run closes it.
    (tmp_path / "proj-data").mkdir(mode=0o755)
    (tmp_path / "proj-data" / "notes.txt").write_text("made before")
    (tmp_path / "proj-data" / "notes.txt").chmod(0o644)
    port = free_port()
    proj = commands.start(
        "proj", str(BIN / "proj"), "run", "--port", str(port), env=clean_env(), cwd=tmp_path
    )
    url = f"http://127.0.0.1:{port}/"
    proj.wait_for_output(f"proj is running: open {url}")
    printed = re.findall(rf"{re.escape(auth.TOKEN_PREFIX)}[\w-]{{40,}}", proj.output())
    assert printed, f"proj run printed no API token:\n{proj.output()[-3000:]}"
    token = printed[0]
    address = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    curl = readme_sign_up_line().replace("ada@example.com", address)
    curl = curl.replace("http://127.0.0.1:5000/", url)
    signed_up = subprocess.run(
        ["bash", "-c", curl],
        env={**clean_env(), "TOKEN": token, "no_proxy": "*", "NO_PROXY": "*"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert signed_up.returncode == 0, signed_up.stderr
    user = json.loads(signed_up.stdout)
    assert user["email"] == address, user

    mail = tmp_path / "proj-data" / "mail"
    proj.until(lambda: any(address in p.read_text() for p in mail.glob("*.eml")))
    proj.until(lambda: http("GET", f"{url}api/users/{user['id']}", token)[1]["welcomed_at"])
    data = tmp_path / "proj-data"
    modes = {
        str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
        for path in [data, *data.rglob("*")]
    }
    assert {path for path, mode in modes.items() if mode & 0o077} == set(), modes
    assert "proj-data/secret-key" in modes and "proj-data/proj.sqlite3" in modes

    assert not re.findall(r"Traceback|dead letter", proj.output()), proj.output()
    family = proj.children()
    names = " ".join(" ".join(process.cmdline()) for process in family)
    assert all(part in names for part in ("flask", "proj.web", "worker", "beat")), names
    if ctrl_c == "proj":
        proj.popen.send_signal(signal.SIGINT)
    else:
        os.killpg(proj.pid, signal.SIGINT)
    assert proj.popen.wait(timeout=90) == 0, proj.output()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert alive == []
    assert "proj: stopped" in proj.output()
    assert "did not stop in time" not in proj.output()


def test_worker_and_beat_refuse_a_short_visibility_timeout(
    stack: Stack, commands: Commands, tmp_path: Path
) -> None:
    """On Redis, ``celery -A proj worker`` and ``beat`` refuse to start when
    the visibility timeout is shorter than the tasks' hard time limit
    (``PROJ_TASK_TIME_LIMIT``, 900 s): they exit non-zero, naming the setting."""
    if not stack.env.get("CELERY_BROKER_URL", "").startswith("redis"):
        pytest.skip("the visibility timeout is a Redis setting")
    env = stack.process_env(PROJ_VISIBILITY_TIMEOUT="5")
    worker = commands.celery("worker", "worker", *WORKER_OPTIONS, env=env)
    beat = commands.celery("beat", "beat", f"--schedule={tmp_path / 'schedule'}", env=env)
    for command in (worker, beat):
        assert command.popen.wait(timeout=90) != 0, command.output()
        output = command.output()
        assert "Redis redelivers unacknowledged messages" in output
        assert "(5 s now)" in output
        assert "PROJ_VISIBILITY_TIMEOUT" in output
    assert "ready." not in worker.output()
    assert "Sending due task" not in beat.output()


def test_docker_compose_runs_the_documented_commands() -> None:
    """docker-compose.yml's services run the commands the documentation's
    table names, with settings proj reads."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    table = documented_commands()
    expected = {
        "migrate": "proj db upgrade",
        "web": 'gunicorn "proj.web:create_app()"',
        "worker": "celery -A proj worker",
        "beat": "celery -A proj beat",
    }
    for service, command in expected.items():
        assert command in table
        given = compose["services"][service]["command"]
        words = shlex.split(given) if isinstance(given, str) else list(given)
        # The same program, then the table's words in order (options may come between).
        wanted, rest = shlex.split(command), iter(words)
        assert words[:1] == wanted[:1] and all(word in rest for word in wanted), service
        known = set(DEFAULTS) | set(JOBS_DEFAULTS) | {"REMAP_SIGTERM", "PROMETHEUS_MULTIPROC_DIR"}
        assert set(compose["services"][service]["environment"]) <= known, service
    consumed = {
        name: shlex.join(service["command"])
        for name, service in compose["services"].items()
        if service.get("command", [])[:4] == ["celery", "-A", "proj", "worker"]
    }
    assert consumed == {
        "worker": "celery -A proj worker -Q celery --loglevel INFO",
        "worker-long": "celery -A proj worker -Q long --prefetch-multiplier 1 --loglevel INFO",
    }, "every queue has workers, the long one prefetching 1"
