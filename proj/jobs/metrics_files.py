"""prometheus_client's multiprocess files: how proj names them, and the
folder one process group counts in.

In multiprocess mode every process keeps its values in files of one folder,
``<kind>_<process>.db``, and a scrape adds them all up. proj names a process
by host and pid (:func:`process_naming`), so that containers, each with pids
of their own, may share a folder.

A process that ended (a prefork child replaced after
``worker_max_tasks_per_child``, or killed) keeps its counts in its files.
:meth:`ProcessGroupFolder.settle_ended` does the bookkeeping for such
processes of this host: prometheus_client's ``mark_process_dead`` drops
their ``live*`` gauges, and in a folder of the group's own their counters,
histograms and summaries are added into one file per kind
(``counter_<host>-ended.db``) and their files removed, so files do not pile
up as children come and go (prometheus_client's issue 204: thousands of
files, scrapes of seconds). A scrape reading the folder meanwhile could see
a count twice or not at all: only the group's own server reads its folder,
one scrape at a time (:mod:`proj.jobs.metrics_server`). A pid reused within
the instant between the check that its process ended and the merge would
lose the new process's first counts; pids wrap around far more slowly.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

FOLDER_PREFIX = "proj-metrics-"
"""How the folders that process groups make for themselves are named."""
ENDED = "ended"
"""What stands for the pid in the names of the files of ended processes' counts."""
SUMMED_KINDS = ("counter", "histogram", "summary")
"""Kinds of multiprocess files whose values add up across processes (gauges' do not)."""


def host_name() -> str:
    """This host's name as file names carry it (``_`` separates a file name's
    parts, so it becomes ``-``)."""
    return socket.gethostname().replace("_", "-")


def process_naming() -> Callable[[], str]:
    """What names a process's files, ``<host>-<pid>`` (the host read once, here)."""
    host = host_name()
    return lambda: f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class ProcessGroupFolder:
    """The multiprocess folder a process group counts in."""

    def __init__(self, path: Path, *, own: bool) -> None:
        self.path = path
        self.own = own
        """Made for this group (else given by ``PROMETHEUS_MULTIPROC_DIR``, and
        maybe shared: its ended processes' files are then left where they are)."""
        self.owner = os.getpid()
        """The process that made it, the only one that removes it."""

    @classmethod
    def make(cls) -> ProcessGroupFolder:
        """A new, empty folder of the group's own, in the temporary folder (``TMPDIR``)."""
        return cls(Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX)), own=True)

    def settle_ended(self) -> None:
        """The bookkeeping for this host's processes that ended (see the
        module's docstring). Raises :class:`OSError` if the folder cannot be
        read or written."""
        host = host_name()
        ended: dict[str, list[Path]] = defaultdict(list)
        for path in self.path.glob("*.db"):
            process = path.stem.rpartition("_")[2]
            name, _, pid = process.rpartition("-")
            if name == host and pid.isdigit() and not _alive(int(pid)):
                ended[process].append(path)
        for process in ended:
            mark_process_dead(process, str(self.path))  # type: ignore[no-untyped-call]
        if not self.own:
            return
        for kind in SUMMED_KINDS:
            files = [
                path
                for paths in ended.values()
                for path in paths
                if path.stem.rpartition("_")[0] == kind and path.exists()
            ]
            if files:
                _add_up(self.path / f"{kind}_{host}-{ENDED}.db", files)

    def remove(self) -> None:
        """Remove the folder, if it is the group's own and this is the
        process that made it (a forked child leaves it alone)."""
        if self.own and os.getpid() == self.owner:
            shutil.rmtree(self.path, ignore_errors=True)


def _add_up(into: Path, files: list[Path]) -> None:
    """Add ``files``' values into ``into`` (made if missing), then remove them."""
    totals: dict[str, float] = defaultdict(float)
    for path in [into, *files] if into.exists() else files:
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
            totals[key] += value
    written = into.with_suffix(".new")  # not *.db: a scrape never reads it half-written
    written.unlink(missing_ok=True)
    values = MmapedDict(str(written))  # type: ignore[no-untyped-call]
    try:
        for key, total in totals.items():
            values.write_value(key, total, 0.0)  # type: ignore[no-untyped-call]
    finally:
        values.close()  # type: ignore[no-untyped-call]
    os.replace(written, into)
    for path in files:
        path.unlink()
