"""The distribution as a user gets it: the wheel built from this checkout and
installed into a fresh virtualenv, its dependencies resolved from PyPI within
requirements.txt's pins (about 20 s with a warm pip cache), no extra.

It installs ``proj`` alone at the top level of ``site-packages``; OpenTelemetry's
API but not its SDK (the ``otel`` extra); the ``proj`` command, which answers
``--version``, migrates and checks the embedded SQLite setup, and refuses
tracing it cannot do in one line; and the testing kit's pytest plugin, which
an adopter's tests use with no ``conftest.py``.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "proj")
"""What the wheel is built from (copied first: a build writes beside its sources)."""
INSTALL_SECONDS = 120
"""The most building and installing may take."""


@dataclass(frozen=True)
class Installed:
    """proj installed from its wheel into a virtualenv of its own."""

    venv: Path
    data_dir: Path
    version: str
    seconds: float

    @property
    def site_packages(self) -> Path:
        found = list(self.venv.glob("lib/python3*/site-packages"))
        assert len(found) == 1, found
        return found[0]

    @property
    def dist_info(self) -> Path:
        return self.site_packages / f"proj-{self.version}.dist-info"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a user's shell with this virtualenv active and
        nothing of proj's configured."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PROJ_", "CELERY_", "OTEL_", "PYTHON", "VIRTUAL_ENV"))
            and k not in ("DATABASE_URL", "SECRET_KEY")
        }
        path = f"{self.venv / 'bin'}{os.pathsep}{base.get('PATH', '')}"
        return {**base, "PATH": path, "PROJ_DATA_DIR": str(self.data_dir), **extra}

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """A command of the virtualenv (``proj``, ``python``…), run outside the checkout."""
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            cwd=self.data_dir,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=120,
        )


def _checked(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_SECONDS)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("distribution")
    source = work / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    started = time.monotonic()
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _checked([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(source)], work)
    (wheel,) = wheels.glob("proj-*.whl")
    venv = work / "venv"
    _checked([sys.executable, "-m", "venv", str(venv)], work)
    install = [str(venv / "bin" / "python"), *pip[1:], "install", "--quiet"]
    constraints = ["--constraint", str(ROOT / "requirements.txt")]
    # pytest for the plugin's test: an adopter's test dependency, not proj's.
    _checked([*install, *constraints, str(wheel), "pytest"], work)
    seconds = time.monotonic() - started
    assert seconds < INSTALL_SECONDS
    data_dir = work / "data"
    data_dir.mkdir()
    return Installed(venv, data_dir, wheel.name.split("-")[1], seconds)


def test_the_wheel_installs_proj_alone_at_the_top_level(installed: Installed) -> None:
    record = (installed.dist_info / "RECORD").read_text().splitlines()
    paths = [line.rsplit(",", 2)[0] for line in record if line]
    inside = {Path(p).parts[0] for p in paths if not p.startswith("..")}
    assert inside == {"proj", installed.dist_info.name}
    outside = {p for p in paths if p.startswith("..")}
    assert outside == {"../../../bin/proj"}
    # The data the package needs at run time is in it.
    assert {"proj/py.typed", "proj/migrations/versions/0001_initial.py"} <= set(paths)
    assert "proj/jobs/migrations/versions/jobs_0001_ledger.py" in paths


def test_the_metadata_names_the_version_the_extras_and_the_plugin(installed: Installed) -> None:
    metadata = email.parser.Parser().parsestr((installed.dist_info / "METADATA").read_text())
    assert metadata["Version"] == installed.version
    assert {"otel", "test", "docs"} <= set(metadata.get_all("Provides-Extra") or [])
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    hard = {r.name for r in requires if r.marker is None}
    assert {name for name in hard if name.startswith("opentelemetry")} == {"opentelemetry-api"}
    otel = {r.name for r in requires if r.marker and r.marker.evaluate({"extra": "otel"})}
    assert otel >= {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"}
    entry_points = (installed.dist_info / "entry_points.txt").read_text()
    assert "[pytest11]\nproj.jobs.testing.plugin = proj.jobs.testing.plugin" in entry_points
    done = installed.run("python", "-c", "import importlib.metadata as m; print(m.version('proj'))")
    assert done.stdout.strip() == installed.version, done.stderr


def test_opentelemetrys_api_is_installed_and_its_sdk_is_not(installed: Installed) -> None:
    probe = textwrap.dedent(
        """
        import importlib.util, json
        import proj.jobs
        from proj.jobs import tracing
        print(json.dumps({
            "api": importlib.util.find_spec("opentelemetry.trace") is not None,
            "sdk": importlib.util.find_spec("opentelemetry.sdk") is not None,
            "missing": tracing.missing_packages(["otlp"]),
            "from": proj.jobs.__file__,
        }))
        """
    )
    done = installed.run("python", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith('{"api": true, "sdk": false, "missing": ["opentelemetry')
    assert str(installed.site_packages) in done.stdout


def test_proj_answers_its_version_migrates_and_checks_sqlite(installed: Installed) -> None:
    version = installed.run("proj", "--version")
    assert version.returncode == 0, version.stderr
    assert installed.version in version.stdout
    upgrade = installed.run("proj", "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    check = installed.run("proj", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"sqlite:///{installed.data_dir}/proj.sqlite3" in check.stdout


def test_tracing_without_the_extra_is_refused_in_one_line(installed: Installed) -> None:
    done = installed.run("proj", "check", OTEL_TRACES_EXPORTER="otlp")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'proj[otel]'" in done.stderr
    assert "opentelemetry-exporter-otlp-proto-http" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


ADOPTER_TEST = '''
"""An adopter's test, with no conftest.py: ``enqueued`` comes from proj's plugin."""

import pytest
from celery import Celery

import proj.jobs.migrations
from proj.jobs import Jobs, SqlAlchemyTask


@pytest.fixture
def jobs_celery_app(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.sqlite3"
    proj.jobs.migrations.upgrade(url)
    app = Celery("adopter", broker="amqp://guest@127.0.0.1:9//", set_as_current=False)
    jobs = Jobs(app, database_url=url)

    @app.task(base=SqlAlchemyTask, name="adopter.greet", shared=False)
    def greet(name):
        return f"hello {name}"

    yield app
    jobs.dispose()


def test_a_job_is_recorded_then_run(jobs_celery_app, enqueued):
    greet = jobs_celery_app.tasks["adopter.greet"]
    with Jobs.of(jobs_celery_app).session_scope() as session:
        greet.apply_async_on_commit(["world"], session=session)
    enqueued.assert_enqueued("adopter.greet", args=["world"])
    assert enqueued.run_enqueued() == 1
'''


def test_an_adopters_tests_get_the_plugins_fixtures(installed: Installed) -> None:
    tests = installed.data_dir / "adopter"
    tests.mkdir()
    (tests / "test_greet.py").write_text(ADOPTER_TEST)
    done = installed.run(
        "python", "-m", "pytest", "-p", "no:cacheprovider", "-W", "error", str(tests)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
