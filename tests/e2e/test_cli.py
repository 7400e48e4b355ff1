"""The ``proj`` command's manners: ``--help`` and ``--version`` load nothing
but click, a setting that is not valid is one line naming it (exit status 2,
no traceback), and ``proj check`` refuses the ``SECRET_KEY`` the web tier
would refuse."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import click
import psutil
import pytest
import stacks
from subprocesses import BIN, Commands, free_port

from proj.cli import LIBRARY_COMMANDS, main

pytestmark = pytest.mark.e2e

REQUIRED = bool(os.environ.get("CI") or os.environ.get("PROJ_REQUIRE_SERVICES"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any proj, database or Celery setting, plus ``extra``."""
    prefixes = ("PROJ_", "DATABASE_", "CELERY_", "SECRET_KEY")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | extra


def proj(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "proj"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_help_and_version_import_nothing_but_click() -> None:
    """What ``proj --help`` and ``proj --version`` run loads no SQLAlchemy,
    Celery, Flask or proj.jobs (what made ``--help`` take a second)."""
    script = (
        "import json, sys\n"
        "from proj.cli import main\n"
        "for args in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('sqlalchemy', 'celery', 'flask', 'kombu', 'proj.jobs', 'proj.config')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "                         or m.startswith(heavy))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_version_is_the_distributions() -> None:
    done = proj("--version", env=clean_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"proj, version {importlib.metadata.version('proj')}"


def test_help_lines_of_the_library_groups_are_theirs() -> None:
    """``proj --help`` shows the library's groups without loading them: the
    lines it shows are the groups' own."""
    context = click.Context(main)
    for name, (_, shown) in LIBRARY_COMMANDS.items():
        command = main.get_command(context, name)
        assert command is not None
        assert command.get_short_help_str(limit=200) == shown
    listed = proj("--help", env=clean_env()).stdout
    assert all(f"  {name}  " in listed for name in LIBRARY_COMMANDS), listed


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("PROJ_WORKER_POOL_SIZE", "abc", "expected a whole number"),
        ("PROJ_WEB_STATEMENT_TIMEOUT", "-1", "expected a number, 0 or more"),
        ("PROJ_LOG_FORMAT", "xml", "expected json or text"),
        ("PROJ_OUTBOX_FAST_PATH", "maybe", "expected 1 or 0"),
        ("PROJ_LOGIN_RATE_LIMIT", "lots", "a rate such as 10/minute"),
        ("PROJ_RATELIMIT_STORAGE_URI", "memcached://cache:11211", "give database, memory://"),
        ("PROJ_TRUSTED_PROXIES", "all", "expected a whole number"),
        ("DATABASE_URL", "postgresql+psycopg://u@db/app", "pip install psycopg"),
        ("DATABASE_URL", "not a url", "is not a database URL"),
        ("CELERY_RESULT_BACKEND", "db+postgresql+pg8000://u@db/app", "pip install pg8000"),
    ],
)
@pytest.mark.parametrize("command", [["check"], ["db", "upgrade"], ["jobs", "upgrade"], ["relay"]])
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: os.PathLike[str], command: list[str], variable: str, value: str, accepts: str
) -> None:
    done = proj(*command, env=clean_env(PROJ_DATA_DIR=str(tmp_path), **{variable: value}))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("proj: ") or lines[0].startswith("Error: "), lines
    assert variable in lines[0] and accepts in lines[0], lines


def require_postgres() -> None:
    problem = stacks.missing_services("postgres")
    if problem:
        if REQUIRED:
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.mark.parametrize("secret_key", [None, "changeme", "short"])
def test_check_refuses_the_secret_key_the_web_tier_refuses(
    tmp_path: os.PathLike[str], secret_key: str | None
) -> None:
    """On PostgreSQL, ``proj check`` finds a missing, default or short
    ``SECRET_KEY`` a problem (exit 1), as the web tier refuses to start with
    it; a good one passes."""
    require_postgres()
    with stacks.postgres_database() as url:
        env = clean_env(PROJ_DATA_DIR=str(tmp_path), DATABASE_URL=url)
        assert proj("db", "upgrade", env=env).returncode == 0
        if secret_key is not None:
            env["SECRET_KEY"] = secret_key
        refused = proj("check", env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "problem:  configuration: set SECRET_KEY" in refused.stderr
        web = subprocess.run(
            [sys.executable, "-c", "from proj.web import create_app; create_app()"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert web.returncode != 0 and "set SECRET_KEY" in web.stderr
        env["SECRET_KEY"] = "a-random-value-long-enough-for-the-web"
        passed = proj("check", env=env)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "SECRET_KEY" not in passed.stderr


def test_check_on_the_embedded_default_needs_no_secret_key(tmp_path: os.PathLike[str]) -> None:
    """Embedded, the web tier keeps a key of its own in the data folder."""
    done = proj("check", env=clean_env(PROJ_DATA_DIR=str(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr


def test_run_on_every_interface_says_its_cookies_are_not_secure(
    commands: Commands, tmp_path: Path
) -> None:
    """``proj run --host 0.0.0.0`` serves plain HTTP beyond this machine: it
    says the console's cookies are not Secure there, and what to do."""
    port = free_port()
    run = commands.start(
        "proj",
        *(str(BIN / "proj"), "run", "--host", "0.0.0.0", "--port", str(port)),  # noqa: S104
        env=clean_env(),
        cwd=tmp_path,
    )
    run.wait_for_output("proj is running")
    assert "session cookies are not Secure" in run.output()
    assert "PROJ_COOKIE_SECURE=1" in run.output()
    assert run.stop(signal.SIGINT) == 0


@pytest.mark.parametrize("ctrl_c", ["proj", "process-group"])
def test_run_stops_on_ctrl_c_though_started_ignoring_it(
    commands: Commands, tmp_path: Path, ctrl_c: str
) -> None:
    """A shell without job control (a script's ``proj run &``, some CI
    runners) starts ``proj run`` with SIGINT ignored, which Python keeps:
    SIGINT, to proj alone or to its group, still stops it and all it
    started, with exit code 0."""
    port = free_port()
    ignoring = 'trap "" INT; exec "$0" "$@"'
    run = commands.start(
        "proj",
        *("bash", "-c", ignoring, str(BIN / "proj"), "run", "--port", str(port)),
        env=clean_env(),
        cwd=tmp_path,
    )
    run.wait_for_output("proj is running")
    family = run.children()
    assert len(family) >= 3, family
    if ctrl_c == "proj":
        run.popen.send_signal(signal.SIGINT)
    else:
        os.killpg(run.pid, signal.SIGINT)
    run.until(lambda: run.popen.poll() is not None, timeout=60)
    assert run.popen.returncode == 0, run.output()[-3000:]
    assert "proj: stopped" in run.output()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert alive == []


def test_run_with_a_metrics_port_serves_the_workers_metrics(
    commands: Commands, tmp_path: Path
) -> None:
    """``PROJ_METRICS_PORT`` with ``proj run``: its worker serves the port
    (beat, which would take the same port, does not), and all keep running."""
    port, metrics_port = free_port(), free_port()
    run = commands.start(
        "proj",
        *(str(BIN / "proj"), "run", "--port", str(port)),
        env=clean_env(PROJ_METRICS_PORT=str(metrics_port), PROJ_METRICS_ADDRESS="127.0.0.1"),
        cwd=tmp_path,
    )
    run.wait_for_output("proj is running")
    assert b"proj_" in run.until(lambda: scrape(f"http://127.0.0.1:{metrics_port}/metrics"))
    assert "PROJ_METRICS_PORT" not in run.output()
    assert run.stop(signal.SIGINT) == 0


def scrape(url: str) -> bytes | None:
    """What ``url`` answers, or None while nothing listens there."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as answer:
            body: bytes = answer.read()
            return body
    except OSError:
        return None
