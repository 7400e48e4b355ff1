"""deploy/kubernetes: every manifest valid against Kubernetes' own schemas
(kubernetes-validate, strict: an unknown field fails), every command it names
accepted by its program, every container unprivileged, probes where they
belong, workers given the time their graceful stop takes, the per-process
metrics announced, the migrations alone holding the owner's URL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deployment import (
    DOCKERFILE,
    KUBERNETES,
    SECRET_VALUES,
    command_of,
    container_env,
    containers,
    database_user,
    is_celery_worker,
    manifests,
    objects,
    parse_commands,
    pod_spec,
    role_defaults,
    shell_words,
    stop_needs,
    workloads,
)

from proj.config import DEFAULTS, load_settings
from proj.jobs.settings import DEFAULTS as JOBS_DEFAULTS

VERSIONS = ("1.30", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests are for (preStop's sleep action is
on by default from 1.30), and the newest the schemas know."""
NOT_SETTINGS = {"REMAP_SIGTERM", "PROMETHEUS_MULTIPROC_DIR"}
"""Variables proj's processes read that are Celery's and prometheus_client's."""
KUSTOMIZE = "kustomize.config.k8s.io/v1beta1"


def deployment(name: str) -> dict[str, Any]:
    (found,) = [d for d in objects("Deployment") if d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    validated = []
    for path, document in manifests():
        if document["apiVersion"] == KUSTOMIZE:
            continue  # kustomize's own file, not an object
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.relative_to(KUBERNETES)}: {where}: {exc.message}")
        validated.append(document["kind"])
    assert {"Deployment", "Job", "Service", "ConfigMap", "Secret"} <= set(validated)
    broken = deployment("proj-web")
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_every_kustomization_lists_its_manifests_and_the_same_image() -> None:
    """Each kustomization.yaml lists every manifest beside it (but the
    Secret's example, which is filled in and applied by hand), and both
    point the image ``proj`` at the same place. No YAML anchors: kustomize
    has not always expanded them."""
    kustomizations = sorted(KUBERNETES.rglob("kustomization.yaml"))
    assert len(kustomizations) == 2
    images = []
    for path in kustomizations:
        kustomization = yaml.safe_load(path.read_text())
        beside = {
            p.name
            for p in path.parent.glob("*.yaml")
            if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
        }
        assert set(kustomization["resources"]) == beside, path
        images.append(kustomization["images"])
    assert images[0] == images[1]
    for path in KUBERNETES.rglob("*.yaml"):
        events = yaml.parse(path.read_text())
        assert not any(getattr(event, "anchor", None) for event in events), path


def test_every_command_parses() -> None:
    """Each container's command and exec probe is accepted by the program
    that runs it (proj, celery, gunicorn), options included."""
    commands = []
    for workload in workloads():
        for container in containers(workload):
            commands.append(command_of(container))
            probe = container.get("livenessProbe", {}).get("exec", {}).get("command")
            if probe:
                assert probe[:2] == ["sh", "-c"]
                commands.append(shell_words(probe[2]))
    parsed = parse_commands(commands)
    refused = {
        " ".join(argv): out for argv, (code, out) in zip(commands, parsed, strict=True) if code
    }
    assert not refused, refused


def test_every_container_sets_only_settings_proj_reads() -> None:
    known = set(DEFAULTS) | set(JOBS_DEFAULTS) | NOT_SETTINGS
    for workload in workloads():
        for container in containers(workload):
            environment = container_env(container)
            assert set(environment) <= known, container["name"]
            load_settings(environment)


def test_every_container_runs_unprivileged() -> None:
    """Every pod runs as the image's user (never root), and every container
    without privilege escalation, capabilities or a writable root."""
    uid = int(re.findall(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)[-1])
    for workload in workloads():
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == uid != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(workload):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            mounted = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            assert "/tmp" in mounted, name


def test_the_web_is_ready_on_healthz_and_checked_before_it_starts() -> None:
    web = deployment("proj-web")
    (check,) = pod_spec(web)["initContainers"]
    assert command_of(check) == ["proj", "check"]
    (container,) = pod_spec(web)["containers"]
    assert container_env(check) == {
        k: v for k, v in container_env(container).items() if k != "PROMETHEUS_MULTIPROC_DIR"
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/"
    command = command_of(container)
    assert command[command.index("--bind") + 1] == "0.0.0.0:5000"
    assert container["ports"] == [{"name": "http", "containerPort": 5000}]
    (service,) = objects("Service")
    assert service["spec"]["selector"] == web["spec"]["selector"]["matchLabels"]
    # The Service stops sending during the preStop pause; gunicorn then has
    # its graceful timeout to finish the requests it holds.
    graceful = float(command[command.index("--graceful-timeout") + 1])
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec(web)["terminationGracePeriodSeconds"] > pause + graceful


def test_workers_get_the_time_their_graceful_stop_takes() -> None:
    """Each worker Deployment remaps SIGTERM to Celery's soft shutdown, and
    its terminationGracePeriodSeconds covers the soft shutdown
    (PROJ_SHUTDOWN_GRACE), the longest hand-back write (PROJ_LOCK_TIMEOUT)
    and a margin."""
    found = []
    for workload in workloads():
        for container in containers(workload):
            if not is_celery_worker(command_of(container)):
                continue
            found.append(workload["metadata"]["name"])
            environment = container_env(container)
            assert environment["REMAP_SIGTERM"] == "SIGQUIT"
            grace = pod_spec(workload)["terminationGracePeriodSeconds"]
            assert grace >= stop_needs(environment), workload["metadata"]["name"]
    assert found == ["proj-worker", "proj-worker-long"]


def test_workers_and_beat_are_probed_as_the_node_they_run_as() -> None:
    for name, node in (
        ("proj-worker", "celery@$HOSTNAME"),
        ("proj-worker-long", "celery@$HOSTNAME"),
        ("proj-beat", "celerybeat@$HOSTNAME"),
    ):
        (container,) = pod_spec(deployment(name))["containers"]
        words = shell_words(container["livenessProbe"]["exec"]["command"][2], "$HOSTNAME")
        assert words[words.index("--destination") + 1] == node, name
    (beat,) = pod_spec(deployment("proj-beat"))["containers"]
    assert "--enable-remote-control" in command_of(beat)


def test_beat_runs_twice_and_nothing_runs_the_relay_alone() -> None:
    """Two beats: the slot scheduler sends each run once. The workers run
    the relay (PROJ_RELAY_IN_WORKER's default), so no pod runs proj relay."""
    assert deployment("proj-beat")["spec"]["replicas"] == 2
    assert "SlotScheduler" in (KUBERNETES / "beat.yaml").read_text()
    assert JOBS_DEFAULTS["PROJ_RELAY_IN_WORKER"] == "1"
    for workload in workloads():
        for container in containers(workload):
            assert "PROJ_RELAY_IN_WORKER" not in container_env(container)
            assert command_of(container)[:2] != ["proj", "relay"]


def test_metrics_are_announced_where_each_process_serves_them() -> None:
    """Worker and beat pods carry scrape annotations for the port their
    process serves /metrics on (PROJ_METRICS_PORT), which they expose."""
    for name in ("proj-worker", "proj-worker-long", "proj-beat"):
        workload = deployment(name)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        (container,) = pod_spec(workload)["containers"]
        port = container_env(container)["PROJ_METRICS_PORT"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": port,
            "prometheus.io/path": "/metrics",
        }, name
        assert {"name": "metrics", "containerPort": int(port)} in container["ports"], name


def test_only_the_migrations_connect_as_the_owner() -> None:
    """The Job migrates as the role that owns the tables; every other
    container connects as the application's role; the Secret's example
    names the init script's roles."""
    roles = role_defaults()
    for workload in workloads():
        for container in containers(workload):
            keys = {
                v["valueFrom"]["secretKeyRef"]["key"]
                for v in container.get("env", [])
                if "valueFrom" in v
            }
            if workload["kind"] == "Job":
                assert keys == {"migrate-database-url"}
                assert database_user(container_env(container)) == roles["owner"]
            else:
                assert "migrate-database-url" not in keys, workload["metadata"]["name"]
                assert database_user(container_env(container)) == roles["app"]
    (secret,) = objects("Secret")
    assert set(secret["stringData"]) == set(SECRET_VALUES)
    assert database_user({"DATABASE_URL": secret["stringData"]["database-url"]}) == roles["app"]
    owner_url = secret["stringData"]["migrate-database-url"]
    assert database_user({"DATABASE_URL": owner_url}) == roles["owner"]
    assert not any(p.name == "secret.yaml" for p in Path(KUBERNETES).rglob("*"))


def test_each_deployment_selects_its_own_pods() -> None:
    selectors = [
        tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in objects("Deployment")
    ]
    assert len(set(selectors)) == len(selectors)
    for workload in objects("Deployment"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
