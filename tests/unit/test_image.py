"""The Dockerfile: the image holds proj's wheel and its runtime dependencies
at the pinned versions, none of the test or development tools, runs as an
unprivileged user, and the files that hold secrets never reach it (nor git).

There is no Docker engine in the tests: the Dockerfile is read instruction
by instruction, and what its pip install would pull in is worked out from
setup.cfg and the installed packages' metadata."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
from importlib import metadata

from deployment import DOCKERFILE, ROOT, command_of, compose, objects, pod_spec
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SECRET_FILES = (".env", ".env.production", "deploy/.env")
"""Where docker compose and people keep secrets."""


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the stage the image is."""
    steps = instructions()
    start = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[start:]


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def requirements(value: str) -> list[Requirement]:
    return [
        Requirement(line)
        for line in (raw.strip() for raw in value.splitlines())
        if line and not line.startswith("#")
    ]


def pinned() -> dict[str, str]:
    """requirements.txt's pins, by canonical name."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def closure(wanted: list[Requirement]) -> set[str]:
    """Every distribution ``wanted`` pulls in, by canonical name, as the
    installed packages' metadata declares their dependencies."""
    seen: set[str] = set()
    todo = [(requirement, frozenset(requirement.extras)) for requirement in wanted]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in (extras or {""})
        ):
            continue
        if name in seen:
            continue
        seen.add(name)
        for declared in metadata.distribution(name).requires or []:
            dependency = Requirement(declared)
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in {*requirement.extras, ""}
            ):
                todo.append((dependency, frozenset(dependency.extras)))
    return seen


def pip_install() -> list[str]:
    """The words of the final stage's ``pip install``."""
    (run,) = [rest for keyword, rest in final_stage() if keyword == "RUN" and "pip install" in rest]
    words = shlex.split(run)
    return words[words.index("pip") :]


def test_the_image_installs_the_wheel_constrained_by_the_pins() -> None:
    """The image installs the wheel built in an earlier stage, with its otel
    extra and gunicorn, requirements.txt as constraints (its pins, not its
    list); the sources are not copied into the image."""
    words = pip_install()
    assert "--constraint" in words
    assert words[words.index("--constraint") + 1].endswith("requirements.txt")
    assert not {"-r", "--requirement", "-e", "--editable"} & set(words)
    wheel = next(word for word in words if ".whl" in word)
    extras = set(re.findall(r"\[(.*)\]$", wheel)[0].split(","))
    assert extras == {"otel"}
    assert extras <= set(setup_cfg()["options.extras_require"])
    assert "gunicorn" in words
    assert not any(
        keyword in ("COPY", "ADD") and rest.startswith(".") for keyword, rest in final_stage()
    )
    assert any(
        "--no-deps --wheel-dir" in rest for keyword, rest in instructions() if keyword == "RUN"
    )


def test_the_image_holds_runtime_dependencies_only_all_pinned() -> None:
    """What that install pulls in has a pin in requirements.txt for each
    package, and not one of the test, docs or development tools."""
    config = setup_cfg()
    runtime = [
        *requirements(config["options"]["install_requires"]),
        *requirements(config["options.extras_require"]["otel"]),
        Requirement("gunicorn"),
    ]
    installed = closure(runtime)
    tools = {
        canonicalize_name(requirement.name)
        for extra in ("test", "docs", "dev")
        for requirement in requirements(config["options.extras_require"][extra])
    } - {"proj"}
    assert installed & tools == set()
    assert {"pytest", "mypy", "ruff", "sphinx"} & installed == set()
    assert installed - set(pinned()) == set(), "every runtime package needs a pin"
    assert {"celery", "flask", "gunicorn", "opentelemetry-sdk", "psycopg2-binary"} <= installed


def test_the_image_runs_as_an_unprivileged_user() -> None:
    """The last USER is numeric (Kubernetes' runAsNonRoot can check it) and
    not root; the data folder is that user's."""
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert int(uid) != 0 and int(gid) != 0
    setup = " ".join(rest for keyword, rest in final_stage() if keyword == "RUN")
    assert f"--uid {uid}" in setup
    assert "chown proj:proj /data" in setup


def test_the_image_sets_what_a_container_needs() -> None:
    environment = " ".join(rest for keyword, rest in final_stage() if keyword == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PROJ_DATA_DIR=/data"):
        assert setting in environment


def test_the_default_command_is_the_web_tier_everywhere() -> None:
    """The image's CMD, compose's web and Kubernetes' web run the same gunicorn."""
    (cmd,) = [rest for keyword, rest in final_stage() if keyword == "CMD"]
    web = [d for d in objects("Deployment") if d["metadata"]["name"] == "proj-web"]
    (container,) = pod_spec(web[0])["containers"]
    assert json.loads(cmd) == command_of(compose()["services"]["web"]) == command_of(container)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context, by
    Docker's rules: ``*`` within a folder, ``**`` across folders, a folder's
    pattern covers what it holds, the last matching line wins (``!`` re-includes)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        glob = re.escape(pattern.removeprefix("!").strip("/"))
        glob = glob.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        glob = glob.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if re.fullmatch(f"{glob}(?:/.*)?", path):
            ignored = not keep
    return ignored


def test_files_that_hold_secrets_reach_neither_the_image_nor_git() -> None:
    for path in SECRET_FILES:
        assert dockerignored(path), f"the image build would see {path}"
        ignored = subprocess.run(
            ["git", "check-ignore", "--no-index", "--quiet", path], cwd=ROOT, check=False
        )
        assert ignored.returncode == 0, f"git would track {path}"
    assert dockerignored(".git/config") and dockerignored("tests/unit/test_image.py")
    assert not dockerignored("proj/cli.py") and not dockerignored("requirements.txt")
