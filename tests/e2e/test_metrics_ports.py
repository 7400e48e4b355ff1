"""Each process group's own ``/metrics`` (``PROJ_METRICS_PORT``), on the
real commands: a prefork worker (two children) answers the sum of what its
children counted, whichever child ran what, through replaced and killed
children and a restart; beat and ``proj relay`` answer theirs; a port in use
stops the start with one line naming the setting; and with no port set,
nothing listens.

Each command runs with ``TMPDIR`` set to a folder of the test's, so the
folder a process group makes for its counts can be looked at, and found
gone once the group has stopped.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import e2e_tasks
import psutil
import pytest
from celery import Celery
from e2e_tasks import create_effects_table, effects
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from subprocesses import (
    BIN,
    WORKER_OPTIONS,
    Command,
    Commands,
    e2e_env,
    enqueue_effects,
    free_port,
)

from proj.db import session_scope, worker_engine
from proj.jobs.models import CLAIMABLE, Job
from proj.jobs.testing import wait_for

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

TASK = "e2e.record_effect"
HOST = socket.gethostname().replace("_", "-")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """``GET /metrics`` on ``port`` of this host: every sample."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def runs(samples: Samples, task: str = TASK) -> dict[str, float]:
    """What ``samples`` count of ``task``'s runs: finished (succeeded) and
    the two histograms' counts."""
    by_task = frozenset({("task", task)})
    return {
        "succeeded": samples.get(
            ("proj_jobs_finished_total", by_task | {("state", "succeeded")}), 0.0
        ),
        "run_duration": samples.get(("proj_job_run_duration_seconds_count", by_task), 0.0),
        "enqueue_to_start": samples.get(("proj_job_enqueue_to_start_seconds_count", by_task), 0.0),
    }


def counted(count: int) -> dict[str, float]:
    """:func:`runs` after ``count`` runs that succeeded."""
    return dict.fromkeys(("succeeded", "run_duration", "enqueue_to_start"), float(count))


def serves(port: int, want: dict[str, float], command: Command) -> None:
    """Wait until ``port`` answers ``want`` (postrun counts after the commit
    the test sees); fail with what it answers and the command's log."""
    with contextlib.suppress(AssertionError, OSError):
        wait_for(lambda: runs(scrape(port)) == want, timeout=20)
    found = runs(scrape(port))
    assert found == want, f"{command.name} on :{port} answers {found}:\n{command.output()[-3000:]}"


def group_folders(tmp: Path) -> list[Path]:
    """The folders process groups made for their counts in ``tmp``."""
    return sorted(tmp.glob("proj-metrics-*"))


def start_worker(commands: Commands, env: dict[str, str], *options: str) -> Command:
    """A prefork worker with two children, the test tasks and ``options``, once ready."""
    worker = commands.celery(
        "worker",
        "worker",
        *WORKER_OPTIONS,
        *options,
        "-n",
        f"e2e-{uuid.uuid4().hex[:8]}@%h",
        "--include=e2e_tasks",
        env=e2e_env(env),
    )
    worker.wait_for_output("ready.")
    return worker


def succeed(worker: Command, env: dict[str, str], count: int, seconds: float = 0.0) -> set[int]:
    """Enqueue ``count`` ``record_effect`` jobs, wait until they all
    succeeded; the pids of the processes that ran them."""
    run = uuid.uuid4().hex[:10]
    ids = enqueue_effects(env, run, count, seconds)
    worker.until(lambda: e2e_tasks.states(ids) == {"succeeded": count}, timeout=60)
    with session_scope() as session:
        return set(session.scalars(select(effects.c.pid).where(effects.c.tag == run)))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """The commands' ``TMPDIR``."""
    made = tmp_path / "tmp"
    made.mkdir()
    return made


@pytest.fixture
def prepared(celery_app: Celery) -> Iterator[None]:
    """No message of an earlier test in the queue, nor of this one afterwards."""
    celery_app.control.purge()
    create_effects_table(worker_engine())
    yield
    celery_app.control.purge()


def on_one_stack(stack: Stack) -> None:
    """The servers and folders do not depend on the database or broker: run
    on the embedded stack only."""
    if stack.name != "sqlite":
        pytest.skip("runs on the embedded stack (the port does not depend on the stack)")


@pytest.mark.usefixtures("prepared")
def test_a_worker_serves_what_its_two_children_counted(
    stack: Stack, commands: Commands, tmp: Path
) -> None:
    """Six jobs of a second's half, both children running some: the
    worker's port answers six runs (finished, both histograms), no pid
    label, and the group's folder holds a file of each child; once the
    worker stops, the folder is gone."""
    port = free_port()
    env = stack.process_env(PROJ_METRICS_PORT=str(port), TMPDIR=str(tmp))
    worker = start_worker(commands, env)

    pids = succeed(worker, env, 6, seconds=0.5)
    assert len(pids) == 2, "both children ran jobs"
    serves(port, counted(6), worker)
    assert "pid" not in {label for _, labels in scrape(port) for label, _ in labels}
    [folder] = group_folders(tmp)
    named = {path.name for path in folder.glob("*.db")}
    assert {f"counter_{HOST}-{pid}.db" for pid in pids} <= named, sorted(named)

    assert worker.stop() == 0
    assert group_folders(tmp) == []


@pytest.mark.usefixtures("prepared")
def test_replaced_killed_and_restarted_workers_count_each_run_once(
    stack: Stack, commands: Commands, tmp: Path
) -> None:
    """With one task per child, every job runs in a child that then ends:
    the port answers each run once, scrape after scrape, and the files of
    ended children are added into one (the folder holds files of living
    processes and ``-ended`` ones only). A child killed with SIGKILL
    (PostgreSQL stacks) takes nothing with it. A worker started anew on the
    port starts from 0, as a restarted Prometheus target does."""
    port = free_port()
    env = stack.process_env(PROJ_METRICS_PORT=str(port), TMPDIR=str(tmp))
    worker = start_worker(commands, env, "--max-tasks-per-child=1")

    pids = succeed(worker, env, 6)
    assert len(pids) == 6, "each job ran in a child of its own"
    serves(port, counted(6), worker)
    serves(port, counted(6), worker)
    [folder] = group_folders(tmp)

    def only_living_and_ended() -> bool:
        # A child may end after a scrape: the next scrape adds its file in.
        scrape(port)
        living = {str(p.pid) for p in [psutil.Process(worker.pid), *worker.children()]}
        named = {path.stem.rpartition("_")[2].rpartition("-")[2] for path in folder.glob("*.db")}
        return "ended" in named and named - {"ended"} <= living

    worker.until(only_living_and_ended)

    if stack.name != "sqlite":  # a killed child may leave the embedded broker's file locked
        # A child that ended its one task may be between its exit and its
        # replacement's start: wait for one.
        victim = worker.until(worker.children)[0]
        victim.send_signal(signal.SIGKILL)
        worker.until(lambda: len(worker.children()) == 2 and victim not in worker.children())
        serves(port, counted(6), worker)
    succeed(worker, env, 4)
    serves(port, counted(10), worker)

    assert worker.stop() == 0
    assert group_folders(tmp) == []
    again = start_worker(commands, env, "--max-tasks-per-child=1")
    serves(port, counted(0), again)
    succeed(again, env, 2)
    serves(port, counted(2), again)


def test_with_no_port_set_nothing_listens(stack: Stack, commands: Commands, tmp: Path) -> None:
    """The default: a worker, its children included, listens on no port and
    makes no folder."""
    on_one_stack(stack)
    worker = start_worker(commands, stack.process_env(TMPDIR=str(tmp)))
    group = [psutil.Process(worker.pid), *worker.children()]
    assert len(group) >= 3
    listening = [
        (process.pid, connection.laddr)
        for process in group
        for connection in process.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]
    assert listening == []
    assert group_folders(tmp) == []


@pytest.mark.usefixtures("prepared")
def test_beat_serves_the_jobs_it_enqueued(
    stack: Stack, commands: Commands, tmp: Path, tmp_path: Path
) -> None:
    """Beat sends the reconciler every second: its port counts them as
    enqueued, as its log says it sent them; once stopped, its folder is gone."""
    on_one_stack(stack)
    port = free_port()
    env = stack.process_env(
        PROJ_METRICS_PORT=str(port), PROJ_RECONCILE_INTERVAL="1", TMPDIR=str(tmp)
    )
    beat = commands.celery(
        "beat", "beat", "--loglevel=INFO", f"--schedule={tmp_path / 'beat'}", env=env
    )
    beat.wait_for_output("Sending due task proj-reconcile-jobs", count=3)
    key = ("proj_jobs_enqueued_total", frozenset({("task", "proj.reconcile_jobs")}))
    enqueued = beat.until(lambda: scrape(port).get(key, 0) >= 3 and scrape(port)[key])
    assert enqueued <= beat.output().count("Sending due task proj-reconcile-jobs")
    assert len(group_folders(tmp)) == 1

    assert beat.stop() == 0
    assert group_folders(tmp) == []


@pytest.mark.usefixtures("prepared")
def test_the_relay_serves_the_jobs_it_published(
    stack: Stack, commands: Commands, tmp: Path
) -> None:
    """With the fast path off, ``proj relay`` publishes every owed job: its
    port counts each one (those of earlier tests still owed, and three of
    this test's) as relayed."""
    on_one_stack(stack)
    port = free_port()
    env = stack.process_env(PROJ_METRICS_PORT=str(port), PROJ_OUTBOX_FAST_PATH="0", TMPDIR=str(tmp))
    with session_scope() as session:
        owed = session.scalar(
            select(func.count()).where(Job.published_at.is_(None), Job.state.in_(CLAIMABLE))
        )
    relay = commands.relay(env)
    ids = enqueue_effects(env, uuid.uuid4().hex[:10], 3)
    relay.until(lambda: all(job.published_at is not None for job in e2e_tasks.jobs(ids)))
    relayed = relay.until(lambda: scrape(port).get(("proj_outbox_relayed_total", frozenset())))
    assert relayed == owed + 3

    assert relay.stop() == 0
    assert group_folders(tmp) == []


@pytest.mark.parametrize("command", ["worker", "beat", "relay"])
def test_a_port_in_use_stops_the_start_with_one_line(
    stack: Stack, commands: Commands, tmp: Path, tmp_path: Path, command: str
) -> None:
    """Something already listens on the port: the command exits unsuccessfully,
    saying so in one line that names the setting, with no traceback, and
    leaves no folder behind."""
    on_one_stack(stack)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104  (where the commands listen by default)
        taken.listen()
        port = taken.getsockname()[1]
        env = stack.process_env(PROJ_METRICS_PORT=str(port), TMPDIR=str(tmp))
        if command == "relay":
            started = commands.start("relay", str(BIN / "proj"), "relay", env=env)
        elif command == "beat":
            schedule = f"--schedule={tmp_path / 'beat'}"
            started = commands.celery("beat", "beat", "--loglevel=INFO", schedule, env=env)
        else:
            started = commands.celery("worker", "worker", *WORKER_OPTIONS, env=env)
        code = started.popen.wait(timeout=90)
    output = started.output()
    said = [line for line in output.splitlines() if "PROJ_METRICS_PORT" in line]
    assert code != 0, output
    assert len(said) == 1, output
    assert said[0].endswith(
        f"proj: PROJ_METRICS_PORT={port}: 0.0.0.0:{port} is in use; give each worker, "
        "beat and relay on a host a port of its own (0: no metrics port)."
    )
    assert "Traceback" not in output
    assert group_folders(tmp) == []
