"""docker-compose.yml, read as Compose reads it: valid against the Compose
specification's schema, every command it names accepted by its program,
migrations and the application on separate database roles, a health check on
every long-running service, workers given the time their graceful stop takes.

There is no Docker engine in the tests: the schema is the Compose
specification's own (tests/schemas/, vendored with its licence)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from deployment import (
    command_of,
    compose,
    compose_named_variables,
    compose_variables,
    database_user,
    is_celery_worker,
    parse_commands,
    proj_services,
    role_defaults,
    shell_words,
    stop_needs,
)

from proj.config import DEFAULTS, load_settings
from proj.jobs.settings import DEFAULTS as JOBS_DEFAULTS

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "compose-spec.json"
ONE_SHOT = {"migrate", "check"}
"""Services that run once, before the others start."""
NOT_SETTINGS = {"REMAP_SIGTERM", "PROMETHEUS_MULTIPROC_DIR"}
"""Variables proj's processes read that are Celery's and prometheus_client's."""


def seconds(duration: str) -> float:
    """A Compose duration such as ``40s`` or ``1m30s``, in seconds."""
    total, number = 0.0, ""
    for char in duration:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
    return total + float(number or 0)


def test_the_file_follows_the_compose_specification() -> None:
    """The file, once interpolated, validates against the specification's
    JSON schema, which refuses any key it does not define."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    # The schema does refuse what Compose would.
    broken = compose()
    broken["services"]["web"]["healthcheck"]["intervl"] = "1s"
    assert not validator.is_valid(broken)


def test_every_variable_it_reads_is_named_in_its_header() -> None:
    assert compose_named_variables() == compose_variables()


def test_every_proj_command_parses() -> None:
    """Each service's command and health check is accepted by the program
    that runs it (proj, celery, gunicorn), options included."""
    commands = []
    for spec in proj_services().values():
        commands.append(command_of(spec))
        test = spec.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD-SHELL"]:
            commands.append(shell_words(test[1]))
    parsed = parse_commands(commands)
    refused = {
        " ".join(argv): out for argv, (code, out) in zip(commands, parsed, strict=True) if code
    }
    assert not refused, refused
    assert parse_commands([["celery", "-A", "proj", "worker", "--no-such-option"]])[0][0] != 0


def test_every_service_sets_only_settings_proj_reads() -> None:
    """Each proj service's environment is made of proj's settings, and proj
    reads it without complaint."""
    known = set(DEFAULTS) | set(JOBS_DEFAULTS) | NOT_SETTINGS
    for name, spec in proj_services().items():
        environment = {key: str(value) for key, value in spec["environment"].items()}
        assert set(environment) <= known, name
        load_settings(environment)


def test_migrations_and_the_application_connect_as_different_roles() -> None:
    """migrate connects as the role that owns the tables; every other proj
    service as the application's role, which the init script makes neither
    superuser nor BYPASSRLS (tests/integration/test_deploy_roles.py)."""
    roles = role_defaults()
    services = proj_services()
    assert database_user(services.pop("migrate")["environment"]) == roles["owner"]
    for name, spec in services.items():
        assert database_user(spec["environment"]) == roles["app"], name
    postgres = compose()["services"]["postgres"]
    assert "./deploy/postgres/init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]


def test_the_web_starts_after_the_migrations_and_the_check() -> None:
    services = compose()["services"]
    assert command_of(services["migrate"]) == ["proj", "db", "upgrade"]
    assert command_of(services["check"]) == ["proj", "check"]
    assert services["check"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    for name in ("web", "worker", "worker-long", "beat"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name
    assert services["web"]["depends_on"]["check"] == {"condition": "service_completed_successfully"}
    # The check sees what the web sees.
    assert services["check"]["environment"] == services["web"]["environment"]


def test_every_long_running_service_has_a_health_check() -> None:
    for name, spec in compose()["services"].items():
        if name not in ONE_SHOT:
            assert spec["healthcheck"]["test"], name
            assert spec.get("restart") == "unless-stopped", name
    web = compose()["services"]["web"]
    probe = " ".join(web["healthcheck"]["test"])
    assert "http://127.0.0.1:5000/healthz" in probe
    assert "0.0.0.0:5000" in command_of(web)


def test_workers_get_the_time_their_graceful_stop_takes() -> None:
    """SIGTERM starts a worker's soft shutdown only with REMAP_SIGTERM=SIGQUIT;
    its stop_grace_period covers the soft shutdown, the hand-back and a
    margin, so Docker never kills a worker that is handing jobs back."""
    workers = {n: s for n, s in proj_services().items() if is_celery_worker(command_of(s))}
    assert set(workers) == {"worker", "worker-long"}
    for name, spec in workers.items():
        environment = {key: str(value) for key, value in spec["environment"].items()}
        assert environment["REMAP_SIGTERM"] == "SIGQUIT", name
        assert seconds(spec["stop_grace_period"]) >= stop_needs(environment), name
    web = proj_services()["web"]
    command = command_of(web)
    graceful = float(command[command.index("--graceful-timeout") + 1])
    assert seconds(web["stop_grace_period"]) > graceful


def test_health_checks_ping_the_node_the_process_runs_as() -> None:
    """A worker answers as celery@ its hostname, beat as celerybeat@ (with
    --enable-remote-control, which beat needs to answer at all)."""
    services = proj_services()
    for name, node in (("worker", "celery@"), ("worker-long", "celery@"), ("beat", "celerybeat@")):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        assert f"--destination {node}$HOSTNAME" in test[1], name
    assert "--enable-remote-control" in command_of(services["beat"])


def test_proj_services_run_as_the_images_user() -> None:
    """No proj service overrides the image's unprivileged user, or asks for privileges."""
    for name, spec in proj_services().items():
        assert "user" not in spec, name
        assert not spec.get("privileged"), name
        assert not spec.get("cap_add"), name
