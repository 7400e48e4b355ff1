"""A process group's own ``/metrics``: what a worker (its prefork children
added up), beat or the relay counted, served on ``PROJ_METRICS_PORT`` from a
thread of its main process, for Prometheus to scrape each pod.

Off by default (:attr:`~proj.jobs.settings.JobsSettings.metrics_port` 0:
nothing listens). ``Jobs(...)`` connects the hooks (:func:`install`): a
worker serves from ``worker_init``, before its pool forks, until
``worker_shutdown``; beat from ``beat_init`` until it exits; a relay of its
own while :meth:`Relay.relay <proj.jobs.relay.Relay.relay>` runs (a relay
thread in a worker finds the worker serving). A process forked from one that
serves (a prefork child, beat embedded with ``-B``) serves nothing itself:
its counts are in the group's.

The group counts in prometheus_client's multiprocess mode: its main process
makes a folder of its own before it forks (:mod:`proj.jobs.metrics_files`),
and each scrape adds up the files of every process of the group. The folder
is removed when the main process stops. With ``PROMETHEUS_MULTIPROC_DIR`` set
when the process started, that folder is used instead and left as it is (the
port then answers everything counted there).

The port answers the counters and histograms of :mod:`proj.jobs.metrics`,
with no token: task names and counts, no tenant, argument or id. The
ledger's gauges stay on the web's ``/metrics`` (:mod:`proj.jobs.metrics_api`),
read once a scrape for the whole deployment, behind a token.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import signals
from prometheus_client import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proj.jobs import metrics
from proj.jobs.errors import ConfigurationError
from proj.jobs.metrics_files import ProcessGroupFolder
from proj.jobs.registry import ATTRIBUTE

if TYPE_CHECKING:
    from flask import Flask

    from proj.jobs.extension import Jobs
    from proj.jobs.settings import JobsSettings

logger = logging.getLogger(__name__)


class ProcessGroupCollector(Collector):
    """Every file of the group's folder added up, after the bookkeeping for
    ended processes; one scrape at a time."""

    def __init__(self, folder: ProcessGroupFolder) -> None:
        self.folder = folder
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                self.folder.settle_ended()
            except OSError as exc:
                logger.warning("metrics: ended processes' files in %s: %s", self.folder.path, exc)
            collector = MultiProcessCollector(None, path=str(self.folder.path))  # type: ignore[no-untyped-call]
            return list(collector.collect())  # type: ignore[no-untyped-call]


class MetricsServer:
    """``/metrics`` of one process group, answered from a daemon thread of
    this process (any path answers; ``/metrics`` is the one documented).

    Raises :class:`~proj.jobs.ConfigurationError`, naming the setting, when
    it cannot listen on ``address``:``port`` (in use, not allowed, or not an
    address of this host).
    """

    def __init__(self, folder: ProcessGroupFolder, address: str, port: int) -> None:
        self.folder = folder
        self.address = address
        self.port = port
        try:
            self._httpd, self._thread = start_http_server(
                port, address, registry=ProcessGroupCollector(folder)
            )
        except OSError as exc:
            raise ConfigurationError(listen_problem(exc, address, port)) from None
        self._thread.name = "proj-metrics"

    def stop(self) -> None:
        """Stop answering and close the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def listen_problem(exc: OSError, address: str, port: int) -> str:
    """One line saying why ``address``:``port`` could not be listened on, and
    which setting to change."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"PROJ_METRICS_PORT={port}: {address}:{port} is in use; give each worker, beat "
            "and relay on a host a port of its own (0: no metrics port)."
        )
    if exc.errno == errno.EACCES:
        return f"PROJ_METRICS_PORT={port}: not allowed to listen on it here; choose another port."
    reason = exc.strerror or str(exc)
    return (
        f"PROJ_METRICS_ADDRESS={address!r}: cannot listen there ({reason}); expected an "
        "address of this host, such as 0.0.0.0 or 127.0.0.1."
    )


_serving: MetricsServer | None = None
"""This process group's server: started here, or in the process this one was
forked from (which then serves it)."""
_serving_lock = threading.Lock()


def serve(settings: JobsSettings) -> MetricsServer | None:
    """Serve this process group's ``/metrics`` on ``settings.metrics_port``,
    unless it is 0 or the group is served already; the server started, or None.

    Call it in the group's main process, before it forks: the processes it
    forks then count in the group's folder (:func:`proj.jobs.metrics.count_in`;
    a new folder, removed by :func:`stop_serving` or at exit, or
    ``PROMETHEUS_MULTIPROC_DIR``'s). Raises :class:`~proj.jobs.ConfigurationError`
    naming the setting when the port cannot be listened on (in use, say),
    leaving nothing behind.
    """
    global _serving
    with _serving_lock:
        if not settings.metrics_port or _serving is not None:
            return None
        given = os.environ.get(metrics.MULTIPROCESS_DIR)
        folder = ProcessGroupFolder(Path(given), own=False) if given else ProcessGroupFolder.make()
        if not metrics.counts_in_files():
            metrics.count_in(folder.path)
        try:
            _serving = MetricsServer(folder, settings.metrics_address, settings.metrics_port)
        except ConfigurationError:
            _stop_counting_in(folder)
            raise
    atexit.unregister(stop_serving)
    atexit.register(stop_serving)
    logger.info(
        "metrics: this process group's /metrics on %s:%d (counted in %s)",
        settings.metrics_address,
        settings.metrics_port,
        folder.path,
    )
    return _serving


def stop_serving() -> None:
    """Stop this process group's ``/metrics`` and remove its own folder; in
    the process that started them only (nothing elsewhere, or when none runs)."""
    global _serving
    with _serving_lock:
        server = _serving
        if server is None or server.folder.owner != os.getpid():
            return
        _serving = None
    server.stop()
    _stop_counting_in(server.folder)


def _stop_counting_in(folder: ProcessGroupFolder) -> None:
    if folder.own:
        metrics.stop_counting_in(folder.path)
        folder.remove()


@contextlib.contextmanager
def serving(settings: JobsSettings) -> Iterator[None]:
    """:func:`serve` for the block (a relay of its own), then :func:`stop_serving`
    if it started a server; nothing where the group is served already."""
    server = serve(settings)
    try:
        yield
    finally:
        if server is not None:
            stop_serving()


def install(jobs: Jobs) -> None:
    """Serve from workers and beat of apps ``Jobs`` is installed on (when
    their settings name a port; connected once a process)."""
    signals.worker_init.connect(_serve_group, weak=False, dispatch_uid=__name__)
    signals.beat_init.connect(_serve_group, weak=False, dispatch_uid=__name__)
    signals.worker_shutdown.connect(_stop_serving_group, weak=False, dispatch_uid=__name__)


def init_app(jobs: Jobs, flask_app: Flask) -> None:
    """Nothing: the web's metrics are its ``/metrics`` route (:mod:`proj.jobs.metrics_api`)."""


def _installation(sender: Any) -> Jobs | None:
    installation: Jobs | None = getattr(getattr(sender, "app", None), ATTRIBUTE, None)
    return installation


def _serve_group(sender: Any = None, **_: Any) -> None:
    """``worker_init`` (before the pool forks) and ``beat_init``."""
    installation = _installation(sender)
    if installation is None:
        return
    try:
        serve(installation.settings)
    except ConfigurationError as exc:
        # Celery logs and swallows a receiver's Exception; SystemExit stops it.
        raise SystemExit(f"proj: {exc}") from exc


def _stop_serving_group(sender: Any = None, **_: Any) -> None:
    if _installation(sender) is not None:
        stop_serving()
