"""The layers: proj.jobs (the library) never imports the reference application,
importing it starts nothing, and only its ledger module changes a job's state."""

from __future__ import annotations

import ast
import configparser
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import proj.celeryconfig
from proj.jobs import ConfigurationError
from proj.jobs.engine import resolve_url

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "proj" / "jobs"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_imports_nothing_of_the_application() -> None:
    crossing = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in LIBRARY.rglob("*.py")
        for name in imported_modules(path)
        if (name == "proj" or name.startswith("proj.")) and not name.startswith("proj.jobs")
    }
    assert crossing == set()


def test_the_distribution_ships_the_proj_package_alone() -> None:
    # Celery's settings are proj.celeryconfig; the checkout's top-level
    # celeryconfig.py re-exports them and is not installed (the wheel itself:
    # tests/e2e/test_distribution.py). The test and benchmark stacks left the package.
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "py_modules" not in setup["options"]
    assert setup["options.packages.find"]["include"] == "proj, proj.*"
    assert not (ROOT / "proj" / "scratch.py").exists()
    assert (ROOT / "tests" / "stacks.py").exists()


def test_the_checkouts_celeryconfig_is_the_packages() -> None:
    spec = importlib.util.spec_from_file_location("celeryconfig", ROOT / "celeryconfig.py")
    assert spec is not None and spec.loader is not None
    top_level = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(top_level)
    settings = {k: v for k, v in vars(proj.celeryconfig).items() if not k.startswith("_")}
    assert {k: getattr(top_level, k, None) for k in settings} == settings
    assert {"task_acks_late", "task_queues", "beat_schedule"} <= set(settings)


IMPORT_PROBE = """
import json, sys, threading
import celery._state
before = (celery._state.get_current_app(), threading.active_count())
import proj.jobs, proj.jobs.api, proj.jobs.auth, proj.jobs.cli, proj.jobs.console
import proj.jobs.migrations, proj.jobs.testing
after = (celery._state.get_current_app(), threading.active_count())
from sqlalchemy import event, orm
from proj.jobs.outbox import _publish_after_commit as publish
print(json.dumps({
    "same_app": before[0] is after[0],
    "threads": [before[1], after[1]],
    "application": sorted(
        m for m in sys.modules if m.startswith("proj.") and not m.startswith("proj.jobs")
    ),
    "listening": event.contains(orm.Session, "after_commit", publish),
}))
"""


def test_importing_the_library_starts_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout)
    assert found == {
        "same_app": True,
        "threads": [found["threads"][0]] * 2,
        "application": [],
        "listening": False,
    }


def test_only_the_ledger_changes_a_jobs_state() -> None:
    writes = re.compile(
        r"(update|insert|delete)\(\s*(Job|JOBS)\b|\b(UPDATE|INSERT INTO|DELETE FROM) jobs\b"
    )
    found = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "proj").rglob("*.py")
        if path.name != "ledger.py"
        and "migrations" not in path.parts
        and writes.search(path.read_text())
    }
    assert found == set()


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://u@db/app", "postgresql+psycopg2://u@db/app"),
        ("postgres://u:secret@db:5433/app", "postgresql+psycopg2://u:secret@db:5433/app"),
        ("postgresql+psycopg2://u@db/app", "postgresql+psycopg2://u@db/app"),
        ("sqlite:///data/app.sqlite3", "sqlite:///data/app.sqlite3"),
    ],
)
def test_postgres_urls_use_the_driver_proj_ships(given: str, used: str) -> None:
    assert resolve_url(given) == used


def test_a_driver_that_is_not_installed_says_what_to_install() -> None:
    with pytest.raises(ConfigurationError, match=r"pip install psycopg\[binary\]") as raised:
        resolve_url("postgresql+psycopg://u:secret@db/app")
    assert "secret" not in str(raised.value)


def test_a_url_that_is_not_one_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not a database URL"):
        resolve_url("not a url")
