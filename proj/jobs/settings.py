"""proj.jobs's settings: defaults in one mapping, overridden from the environment.

Read when a :class:`~proj.jobs.Jobs` is made (never at import), or built by
hand with :meth:`JobsSettings.from_environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proj.jobs.engine import resolve_url
from proj.jobs.errors import ConfigurationError

DEFAULTS: Mapping[str, str] = {
    "DATABASE_URL": "",
    "PROJ_WORKER_POOL_SIZE": "5",
    "PROJ_OUTBOX_FAST_PATH": "1",
    "PROJ_RELAY_IN_WORKER": "1",
    "PROJ_RELAY_POLL_INTERVAL": "1",
    "PROJ_RELAY_GRACE": "2",
    "PROJ_RECONCILE_INTERVAL": "60",
    "PROJ_STALE_AFTER": "300",
    "PROJ_MAX_ATTEMPTS": "3",
    "PROJ_RETENTION_DAYS": "30",
    "PROJ_MAX_MESSAGE_SIZE": "1048576",
    "PROJ_WORKER_STATEMENT_TIMEOUT": "0",
    "PROJ_WORKER_ANSWER_WITHIN": "0",
    "PROJ_LOCK_TIMEOUT": "10",
    "PROJ_HEARTBEAT_INTERVAL": "10",
    "PROJ_RABBITMQ_CONSUMER_TIMEOUT": "1800",
    "PROJ_SHUTDOWN_GRACE": "25",
    "PROJ_LOG_FORMAT": "text",
    "PROJ_METRICS_PORT": "0",
    "PROJ_METRICS_ADDRESS": "0.0.0.0",  # noqa: S104  (scraped from other pods)
}
"""The default of every setting proj.jobs reads, by environment variable."""
LOG_FORMATS = ("text", "json")
"""What ``PROJ_LOG_FORMAT`` may be."""
MAX_PORT = 65535


@dataclass(frozen=True)
class JobsSettings:
    """What proj.jobs runs with. Build it with :meth:`from_environ`."""

    database_url: str
    """Where the job ledger lives (the application's database); read from the
    environment, with the driver proj ships where the URL names none
    (:func:`~proj.jobs.engine.resolve_url`)."""
    worker_pool_size: int = 5
    """Connections in each worker process's pool (the task sessions' engine)."""
    outbox_fast_path: bool = True
    """Publish a job as soon as its transaction commits (else the relay does)."""
    relay_in_worker: bool = True
    """Run the relay inside each worker (small deployments; else ``proj relay``)."""
    relay_poll_interval: float = 1.0
    """Seconds between the relay's polls of the ledger (on PostgreSQL it also
    wakes on ``NOTIFY``)."""
    relay_grace: float = 2.0
    """Seconds the relay leaves a new row to the fast path."""
    reconcile_interval: float = 60.0
    """Seconds between reconciler runs (a beat entry ``Jobs`` adds)."""
    stale_after: float = 300.0
    """Seconds after which a published job that never started, or a running
    job whose worker is gone, is sent again by the reconciler."""
    max_attempts: int = 3
    """Attempts a job gets when its task sets none (a worker that dies running
    it counts as one)."""
    retention_days: int = 30
    """Days finished jobs, and the audit trail's entries, are kept
    (:meth:`proj.jobs.Jobs.prune`)."""
    worker_statement_timeout: float = 0
    """Seconds a statement of a task may run before PostgreSQL cancels it (0: no limit)."""
    worker_answer_within: float = 0
    """Seconds a task waits for PostgreSQL to answer at all before it gives up
    on the connection (a transient error: the task retries); 0: as long as
    TCP allows (keepalives and ``tcp_user_timeout`` end a partition in about
    10 s). Longer than any statement a task runs."""
    lock_timeout: float = 10
    """Seconds a statement may wait for a lock before PostgreSQL gives up (a
    transient error: the task retries)."""
    heartbeat_interval: float = 10
    """Seconds between a worker's heartbeats (0: none; the reconciler then asks
    the broker who runs what)."""
    shutdown_grace: float = 25
    """Seconds a worker asked to stop lets its running tasks finish before it
    cuts them off and hands their jobs back (Celery's soft shutdown,
    ``worker_soft_shutdown_timeout``; SIGTERM starts it when the worker runs
    with ``REMAP_SIGTERM=SIGQUIT``)."""
    rabbitmq_consumer_timeout: float = 1800
    """RabbitMQ's ``consumer_timeout`` in seconds (its default: 30 minutes), for
    the start-up check that every time limit and countdown stays under it (0:
    not checked)."""
    max_message_size: int = 1_048_576
    """Largest a job's arguments may be, in bytes of JSON (0: no limit): a job
    over it is refused at ``delay_on_commit`` rather than by the broker later."""
    log_format: str = "text"
    """``text`` (what Celery and Flask write by default) or ``json``: one JSON
    object a line from every process (:mod:`proj.jobs.logs`)."""
    metrics_port: int = 0
    """Where each worker, beat and relay serves its own ``/metrics`` (its
    prefork children added up; :mod:`proj.jobs.metrics_server`); 0: none. Two
    processes on one host need two ports."""
    metrics_address: str = "0.0.0.0"  # noqa: S104  (scraped from other pods)
    """The address ``metrics_port`` listens on: every interface, as Prometheus
    scrapes pods from outside them (``127.0.0.1``: this host only)."""

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> JobsSettings:
        """Read the settings from ``environ`` (default: ``os.environ``); keyword
        arguments win over both. Raises :class:`ConfigurationError` naming the
        variable whose value is not valid."""
        env = os.environ if environ is None else environ

        def raw(name: str) -> str:
            return env.get(name) or DEFAULTS[name]

        def read(name: str, kind: type[int] | type[float]) -> Any:
            return number(name, raw(name), kind)

        def flag(name: str) -> bool:
            value = raw(name).strip().lower()
            if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise ConfigurationError(f"{name}={raw(name)!r}: expected 1 or 0.")
            return value in ("1", "true", "yes", "on")

        settings = cls(
            database_url=raw("DATABASE_URL"),
            worker_pool_size=read("PROJ_WORKER_POOL_SIZE", int),
            outbox_fast_path=flag("PROJ_OUTBOX_FAST_PATH"),
            relay_in_worker=flag("PROJ_RELAY_IN_WORKER"),
            relay_poll_interval=read("PROJ_RELAY_POLL_INTERVAL", float),
            relay_grace=read("PROJ_RELAY_GRACE", float),
            reconcile_interval=read("PROJ_RECONCILE_INTERVAL", float),
            stale_after=read("PROJ_STALE_AFTER", float),
            max_attempts=read("PROJ_MAX_ATTEMPTS", int),
            retention_days=read("PROJ_RETENTION_DAYS", int),
            max_message_size=read("PROJ_MAX_MESSAGE_SIZE", int),
            worker_statement_timeout=read("PROJ_WORKER_STATEMENT_TIMEOUT", float),
            worker_answer_within=read("PROJ_WORKER_ANSWER_WITHIN", float),
            lock_timeout=read("PROJ_LOCK_TIMEOUT", float),
            shutdown_grace=read("PROJ_SHUTDOWN_GRACE", float),
            rabbitmq_consumer_timeout=read("PROJ_RABBITMQ_CONSUMER_TIMEOUT", float),
            heartbeat_interval=read("PROJ_HEARTBEAT_INTERVAL", float),
            log_format=raw("PROJ_LOG_FORMAT").strip().lower(),
            metrics_port=read("PROJ_METRICS_PORT", int),
            metrics_address=raw("PROJ_METRICS_ADDRESS").strip(),
        )
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        if not settings.database_url:
            raise ConfigurationError(
                "proj.jobs needs a database: pass database_url= or set DATABASE_URL."
            )
        try:
            settings = replace(settings, database_url=resolve_url(settings.database_url))
        except ConfigurationError as exc:
            raise ConfigurationError(f"DATABASE_URL: {exc}") from None
        if settings.metrics_port > MAX_PORT:
            raise ConfigurationError(
                f"PROJ_METRICS_PORT={str(settings.metrics_port)!r}: expected a port, 1 to"
                f" {MAX_PORT}, or 0 for none."
            )
        if settings.log_format not in LOG_FORMATS:
            raise ConfigurationError(
                f"PROJ_LOG_FORMAT={settings.log_format!r}: expected json or text."
            )
        return settings

    @property
    def embedded(self) -> bool:
        """True when the database is SQLite (the no-servers setup)."""
        return self.database_url.startswith("sqlite")


def number(name: str, value: str, kind: type[int] | type[float]) -> Any:
    """``value`` as a non-negative ``kind``, or :class:`ConfigurationError` naming ``name``."""
    expected = "a whole number" if kind is int else "a number"
    try:
        parsed = kind(value)
    except ValueError:
        raise ConfigurationError(f"{name}={value!r}: expected {expected}, 0 or more.") from None
    if parsed < 0:
        raise ConfigurationError(f"{name}={value!r}: expected {expected}, 0 or more.")
    return parsed
