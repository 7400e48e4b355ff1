"""The per-process-group metrics' settings and folder bookkeeping, with no
services: real processes write prometheus_client's multiprocess files, end,
and a scrape still adds up to what they counted, from fewer files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from proj.jobs import ConfigurationError, JobsSettings
from proj.jobs.metrics_files import ProcessGroupFolder, process_naming
from proj.jobs.metrics_server import MetricsServer

COUNT = """
import sys
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from proj.jobs.metrics_files import process_naming
values.ValueClass = values.MultiProcessValue(process_naming())
registry = CollectorRegistry()
runs = Counter("runs_total", "Runs.", ["task"], registry=registry)
took = Histogram("took_seconds", "Took.", ["task"], buckets=(1, 10), registry=registry)
busy = Gauge("busy", "Busy.", registry=registry, multiprocess_mode="livesum")
for task, seconds in (("a", 0.5), ("a", 5), ("b", 20)):
    runs.labels(task).inc()
    took.labels(task).observe(seconds)
busy.set(1)
"""
"""What one process counts: three runs of two tasks, and a live gauge."""


def count_in(folder: Path) -> None:
    """A process that counts :data:`COUNT` in ``folder``, then ends."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", COUNT], env=env, check=True, timeout=60)


def totals(folder: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What a scrape of ``folder`` answers."""
    collector = MultiProcessCollector(None, path=str(folder))  # type: ignore[no-untyped-call]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()  # type: ignore[no-untyped-call]
        for sample in family.samples
    }


def test_settings_default_to_no_port_on_every_interface() -> None:
    settings = JobsSettings.from_environ({"DATABASE_URL": "sqlite://"})
    assert (settings.metrics_port, settings.metrics_address) == (0, "0.0.0.0")  # noqa: S104
    given = {"DATABASE_URL": "sqlite://", "PROJ_METRICS_PORT": "9191"}
    given["PROJ_METRICS_ADDRESS"] = " 127.0.0.1 "
    settings = JobsSettings.from_environ(given)
    assert (settings.metrics_port, settings.metrics_address) == (9191, "127.0.0.1")


@pytest.mark.parametrize("port", ["abc", "-1", "65536", "9191.5"])
def test_a_port_that_is_not_one_names_the_setting(port: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^PROJ_METRICS_PORT='{port}': expected "):
        JobsSettings.from_environ({"DATABASE_URL": "sqlite://", "PROJ_METRICS_PORT": port})


def test_an_address_not_of_this_host_names_the_setting(tmp_path: Path) -> None:
    folder = ProcessGroupFolder(tmp_path, own=True)
    with pytest.raises(ConfigurationError, match=r"^PROJ_METRICS_ADDRESS='192\.0\.2\.1': "):
        MetricsServer(folder, "192.0.2.1", 9191)  # TEST-NET-1: nobody's address


def test_ended_processes_are_added_into_one_file_per_kind(tmp_path: Path) -> None:
    """Two processes counted and ended: the scrape's totals stay the same
    once their counters and histograms are added into ``-ended`` files and
    their live gauges dropped; a third one's counts add to those files."""
    count_in(tmp_path)
    count_in(tmp_path)
    before = totals(tmp_path)
    assert before[("runs_total", (("task", "a"),))] == 4
    assert before[("busy", ())] == 2

    folder = ProcessGroupFolder(tmp_path, own=True)
    folder.settle_ended()
    host = process_naming()().rpartition("-")[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"counter_{host}-ended.db",
        f"histogram_{host}-ended.db",
    ]
    del before[("busy", ())]  # a live gauge of ended processes
    assert totals(tmp_path) == before

    count_in(tmp_path)
    folder.settle_ended()
    assert len(list(tmp_path.iterdir())) == 2
    after = totals(tmp_path)
    assert after[("runs_total", (("task", "a"),))] == 6
    assert after[("took_seconds_bucket", (("le", "10.0"), ("task", "a")))] == 6
    assert after[("took_seconds_count", (("task", "b"),))] == 3


def test_a_folder_given_keeps_ended_processes_files(tmp_path: Path) -> None:
    """``PROMETHEUS_MULTIPROC_DIR``'s folder may be shared (the web reads it
    too): only the live gauges of ended processes go."""
    count_in(tmp_path)
    ProcessGroupFolder(tmp_path, own=False).settle_ended()
    assert sorted(path.name.partition("_")[0] for path in tmp_path.iterdir()) == [
        "counter",
        "histogram",
    ]


def test_only_the_process_that_made_a_folder_removes_it() -> None:
    folder = ProcessGroupFolder.make()
    assert folder.path.name.startswith("proj-metrics-")
    ProcessGroupFolder(folder.path, own=False).remove()
    assert folder.path.is_dir()
    folder.remove()
    assert not folder.path.exists()
