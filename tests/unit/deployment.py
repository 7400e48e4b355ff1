"""Reading the deployment files as their tools do: docker-compose.yml with
Compose's interpolation, the Kubernetes manifests with each container's
environment, the commands they name parsed by the programs that run them.

Shared by test_compose.py, test_kubernetes.py and test_image.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import make_url

from proj.jobs.settings import JobsSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
INIT_SCRIPT = ROOT / "deploy" / "postgres" / "init" / "10-proj-roles.sh"
DOCKERFILE = ROOT / "Dockerfile"

SHUTDOWN_MARGIN = 5
"""Seconds a worker's stop may take beyond its soft shutdown and the longest
hand-back write: the pool's and the connections' closing."""
PLACEHOLDER_PASSWORD = "placeholder-password"
PLACEHOLDER_SECRET_KEY = "placeholder-secret-key-of-32-characters"
SECRET_VALUES = {
    "database-url": "postgresql://proj_app:x@postgres:5432/proj",
    "migrate-database-url": "postgresql://proj_owner:x@postgres:5432/proj",
    "broker-url": "amqp://proj:x@rabbitmq:5672//",
    "secret-key": PLACEHOLDER_SECRET_KEY,
}
"""What a test reads for each key of the Secret the manifests name."""

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?P<modifier>[^}]*)\}|(?P<named>[A-Za-z_]\w*))"
)


def interpolate(value: Any, environ: Mapping[str, str], named: set[str]) -> Any:
    """``value`` with Compose's interpolation applied to every string in it
    (``$$`` is a literal ``$``; ``${VAR:?message}`` fails when unset); the
    variables met are added to ``named``."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ, named) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ, named) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        named.add(name)
        modifier = match["modifier"] or ""
        if name in environ:
            return environ[name]
        if modifier.startswith((":-", "-")):
            return modifier.split("-", 1)[1]
        raise KeyError(f"${{{name}}} is not set: {modifier}")

    return _VARIABLE.sub(substitute, value)


def compose_variables() -> set[str]:
    """The variables docker-compose.yml's header tells the user to set."""
    header = COMPOSE_FILE.read_text().split("\n\n", 1)[0]
    return set(re.findall(r"^#\s+([A-Z][A-Z0-9_]*)=", header, re.MULTILINE))


def compose() -> dict[str, Any]:
    """docker-compose.yml as ``docker compose config`` sees it, every variable
    its header names set to a placeholder."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    environ = {name: PLACEHOLDER_PASSWORD for name in compose_variables()}
    environ["SECRET_KEY"] = PLACEHOLDER_SECRET_KEY
    return dict(interpolate(raw, environ, set()))


class _Anything(dict[str, str]):
    """An environment in which every variable is set."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "set"


def compose_named_variables() -> set[str]:
    """Every variable docker-compose.yml interpolates."""
    named: set[str] = set()
    interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), _Anything(), named)
    return named


def proj_services() -> dict[str, dict[str, Any]]:
    """The services that run proj's image (built from the Dockerfile)."""
    return {name: spec for name, spec in compose()["services"].items() if "build" in spec}


def command_of(spec: Mapping[str, Any]) -> list[str]:
    """A service's or a container's command as a list of words."""
    given = spec.get("command") or []
    return shlex.split(given) if isinstance(given, str) else [str(word) for word in given]


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes, with its file."""
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def objects(kind: str) -> list[dict[str, Any]]:
    """The manifests' objects of ``kind``."""
    return [document for _, document in manifests() if document["kind"] == kind]


def pod_spec(document: Mapping[str, Any]) -> dict[str, Any]:
    """The pod template's spec of a Deployment or a Job."""
    return dict(document["spec"]["template"]["spec"])


def workloads() -> list[dict[str, Any]]:
    """The Deployments and Jobs."""
    return [d for _, d in manifests() if d["kind"] in ("Deployment", "Job")]


def containers(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A workload's containers, init containers first."""
    spec = pod_spec(document)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """What a container's process finds in its environment: the ConfigMaps
    it reads, then its own variables (a Secret's key read as :data:`SECRET_VALUES`)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in objects("ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        else:
            env[variable["name"]] = SECRET_VALUES[variable["valueFrom"]["secretKeyRef"]["key"]]
    return env


def database_user(environ: Mapping[str, str]) -> str | None:
    """The role ``DATABASE_URL`` connects as."""
    return make_url(environ["DATABASE_URL"]).username


def stop_needs(environ: Mapping[str, str]) -> float:
    """Seconds a worker started with ``environ`` may take to stop gracefully:
    its soft shutdown, the longest a hand-back write waits for a lock, and
    :data:`SHUTDOWN_MARGIN`."""
    settings = JobsSettings.from_environ(environ)
    return settings.shutdown_grace + settings.lock_timeout + SHUTDOWN_MARGIN


def is_celery_worker(command: list[str]) -> bool:
    return command[:1] == ["celery"] and "worker" in command


def role_defaults() -> dict[str, str]:
    """The role names the init script makes unless told otherwise."""
    text = INIT_SCRIPT.read_text()
    return dict(re.findall(r'^(owner|app)="\$\{PROJ_\w+_ROLE:-(\w+)\}"', text, re.MULTILINE))


_PARSE_COMMANDS = """
import json, sys
from click.testing import CliRunner
from celery.bin.celery import celery
from gunicorn.config import Config
from proj.cli import main as proj

answers = []
for argv in json.load(sys.stdin):
    if argv[0] == "gunicorn":
        try:
            Config().parser().parse_args(argv[1:])
            answers.append([0, ""])
        except SystemExit as exc:
            answers.append([exc.code or 0, "gunicorn refused the arguments"])
        continue
    group = {"proj": proj, "celery": celery}[argv[0]]
    done = CliRunner().invoke(group, [*argv[1:], "--help"], prog_name=argv[0])
    answers.append([done.exit_code, done.output])
json.dump(answers, sys.stdout)
"""


def parse_commands(argvs: list[list[str]]) -> list[tuple[int, str]]:
    """For each command, the exit status and output of its program asked for
    ``--help`` after every given option (an unknown command or option fails;
    nothing runs): ``proj`` and ``celery`` through their click groups,
    ``gunicorn`` through its option parser. In a process of its own, on
    the embedded setup in a throwaway folder."""
    with tempfile.TemporaryDirectory(prefix="proj-commands-") as data:
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PROJ_", "CELERY_")) and key != "DATABASE_URL"
        }
        done = subprocess.run(
            [sys.executable, "-c", _PARSE_COMMANDS],
            input=json.dumps(argvs),
            env={**environ, "PROJ_DATA_DIR": data},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    return [(int(code), str(output)) for code, output in json.loads(done.stdout)]


def shell_words(script: str, hostname: str = "proj-host") -> list[str]:
    """The command a ``sh -c`` script runs, ``$HOSTNAME`` expanded."""
    words = shlex.split(script.replace("$HOSTNAME", hostname))
    return words[1:] if words[:1] == ["exec"] else words
