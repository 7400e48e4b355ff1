"""Tracing is an extra (``proj[otel]``): without OpenTelemetry's SDK, exporter
and instrumentations, every module of proj imports and a job is enqueued and
run untraced; asking for tracing then is refused in one line saying what to
install. The packages are hidden from a subprocess by an import hook
(tests/e2e/test_distribution.py checks the same in a virtualenv without them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_THE_EXTRA = """
import importlib, importlib.abc, json, os, pkgutil, sys

HIDDEN = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation")

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(HIDDEN):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())

from celery import Celery

import proj
import proj.jobs.migrations
from proj.jobs import ConfigurationError, Jobs, SqlAlchemyTask, tracing
from proj.jobs.testing import in_memory

found = {"imported": 0}
for module in pkgutil.walk_packages(proj.__path__, "proj."):
    if not module.name.endswith(".env"):  # Alembic's, run by its migrations only
        importlib.import_module(module.name)
        found["imported"] += 1

url = f"sqlite:///{sys.argv[1]}/jobs.sqlite3"
proj.jobs.migrations.upgrade(url)
celery_app = Celery("untraced", broker="amqp://guest@127.0.0.1:9//", set_as_current=False)
jobs = Jobs(celery_app, database_url=url)

@celery_app.task(base=SqlAlchemyTask, name="untraced.add", shared=False, ignore_result=False)
def add(a, b):
    return a + b

with in_memory(celery_app) as queue:
    with jobs.session_scope() as session:
        add.apply_async_on_commit([2, 3], session=session)
    found["ran"] = queue.run_enqueued()
found["missing"] = tracing.missing_packages(["otlp"])

def refused(turn_on):
    try:
        turn_on()
    except ConfigurationError as exc:
        return str(exc)

found["enable"] = refused(tracing.enable)
os.environ["OTEL_TRACES_EXPORTER"] = "console"
found["install"] = refused(lambda: Jobs(Celery("traced", set_as_current=False), database_url=url))
jobs.dispose()
print(json.dumps(found))
"""

EXTRA = [
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-celery",
    "opentelemetry-instrumentation-flask",
    "opentelemetry-instrumentation-sqlalchemy",
    "opentelemetry-exporter-otlp-proto-http",
]


@pytest.fixture(scope="module")
def without_the_extra(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    data = tmp_path_factory.mktemp("untraced")
    env = {"PATH": "/usr/bin:/bin", "PROJ_DATA_DIR": str(data)}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA, str(data)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return found


def test_proj_imports_and_runs_a_job_untraced(without_the_extra: dict[str, object]) -> None:
    assert isinstance(without_the_extra["imported"], int) and without_the_extra["imported"] > 50
    assert without_the_extra["ran"] == 1
    assert without_the_extra["missing"] == EXTRA


def test_tracing_asked_for_from_the_environment_is_refused(
    without_the_extra: dict[str, object],
) -> None:
    assert without_the_extra["install"] == (
        f"OTEL_TRACES_EXPORTER='console' turns tracing on, but {', '.join(EXTRA[:4])} are not"
        " installed: pip install 'proj[otel]', or set OTEL_TRACES_EXPORTER=none."
    )


def test_tracing_turned_on_in_code_is_refused(without_the_extra: dict[str, object]) -> None:
    assert without_the_extra["enable"] == (
        f"Tracing needs the proj[otel] extra ({', '.join(EXTRA[:4])} are not installed):"
        " pip install 'proj[otel]'."
    )
