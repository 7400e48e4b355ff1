"""``Jobs``: proj.jobs installed onto one Celery app (and, with ``init_app``,
one Flask app), as Flask extensions and Celery's fixups install themselves.

Nothing happens at import: ``Jobs(celery_app, ...)`` connects its worker and
beat hooks for that app only, and ``init_app(flask_app, db)`` lets views
enqueue in ``db.session``'s transaction and runs tasks in the Flask app's
context.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.concurrency import get_implementation
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from flask import Flask, has_app_context
from flask import current_app as current_flask_app
from flask_sqlalchemy import SQLAlchemy
from kombu.message import Message
from sqlalchemy import Engine, orm

from proj.jobs import (
    audit,
    context,
    ledger,
    logs,
    metrics,
    metrics_server,
    outbox,
    plain_canvas,
    revoke,
    sqlite_forks,
    tracing,
)
from proj.jobs.checks import check_configuration
from proj.jobs.clock import utcnow
from proj.jobs.deadletter import record_message
from proj.jobs.engine import make_engine, prepare_engine, resolve_result_backend, resolve_url
from proj.jobs.errors import ConfigurationError
from proj.jobs.heartbeat import HeartbeatStep
from proj.jobs.reconciler import reconcile_jobs
from proj.jobs.registry import install, jobs_of
from proj.jobs.relay import RelayStep
from proj.jobs.sender import EXIT_WAIT, Sender
from proj.jobs.session import scoped_sessions, session_scope, system_session
from proj.jobs.settings import JobsSettings
from proj.jobs.task import SqlAlchemyTask

DEFAULT_CONSUMER = "celery.worker.consumer:Consumer"
DEFAULT_SCHEDULER = "celery.beat:PersistentScheduler"
RECONCILE_TASK = "proj.reconcile_jobs"
OBSERVERS = (tracing, logs, metrics, metrics_server)
"""What watches jobs: traces, structured logs, metrics (and each worker's,
beat's and relay's port serving them)."""
RESULT_BACKEND_VARIABLE = "CELERY_RESULT_BACKEND"
"""The variable Celery reads its result backend from before its settings."""
EXTENSION_KEY = "proj.jobs"
"""Where ``init_app`` leaves the :class:`Jobs` in ``flask_app.extensions``."""
PRUNE_BATCH = 5_000
"""Jobs :meth:`Jobs.prune` deletes a transaction (with their attempts)."""


class Jobs:
    """proj.jobs on ``celery_app``: task sessions on a worker pool of their own,
    fork safety, ledger claims, the relay and heartbeats in its workers,
    beat's slot scheduler and the reconciler's beat entry, dead letters, the
    soft shutdown's grace, and start-up configuration checks.

    ``database_url`` (default: ``DATABASE_URL``) is where the ledger lives,
    and what tasks' sessions connect to; other settings come from ``settings``
    or the environment (:class:`~proj.jobs.settings.JobsSettings`). A worker
    consumer or beat scheduler the app already names is kept (dead letters
    and once-per-slot beat runs then need proj's classes in the chain).

    Celery's revoke and terminate of a ledger job are kept in the ledger
    (:mod:`proj.jobs.revoke`), so no restart or reconciler undoes them.

    A database result backend's URL (``result_backend``, or the
    ``CELERY_RESULT_BACKEND`` variable Celery reads before it) gets the driver
    proj ships where it names none, as the ledger's does.
    """

    def __init__(
        self,
        celery_app: Celery,
        *,
        database_url: str | None = None,
        settings: JobsSettings | None = None,
    ) -> None:
        if settings is None:
            settings = JobsSettings.from_environ(database_url=database_url)
        self.settings = settings
        """What this installation runs with."""
        self.celery_app = celery_app
        self.database_url = resolve_url(settings.database_url)
        """The ledger's database, with the driver proj ships where the URL named none."""
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self.session = scoped_sessions(lambda: self.engine)
        """The task-scoped session: inside a task run, that run's own session."""
        self.flask_app: Flask | None = None
        self.flask_db: SQLAlchemy | None = None
        self.node: str | None = None
        """The node name (``celery@host``) of the worker this process serves,
        once it starts: what its heartbeats and its runs' claims name."""
        self.limits_left_to_us = False
        """Whether the worker this process serves runs Celery's threads pool,
        which enforces no time limit (:mod:`proj.jobs.time_limits` does)."""
        self.capture: Callable[[Sequence[Mapping[str, Any]]], None] | None = None
        """Where job messages go instead of the broker, when set (the testing
        kit's in-memory mode, :func:`proj.jobs.testing.in_memory`)."""
        self.sender = Sender(self)
        """The fast path's publishing thread in this process (:mod:`proj.jobs.sender`)."""
        self._install()

    @staticmethod
    def of(celery_app: Celery) -> Jobs:
        """The installation on ``celery_app``; :class:`~proj.jobs.NotInstalledError` if none."""
        return jobs_of(celery_app)

    @property
    def engine(self) -> Engine:
        """The worker tier's engine: the ledger's writes and task sessions, made
        on first use in each process (after a fork, in the child)."""
        engine = self._engine
        if engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = make_engine(
                        self.database_url,
                        self.settings.worker_pool_size,
                        role="worker",
                        statement_timeout=self.settings.worker_statement_timeout,
                        lock_timeout=self.settings.lock_timeout,
                        answer_within=self.settings.worker_answer_within,
                    )
                engine = self._engine
        return engine

    def dispose(self) -> None:
        """Close the worker tier's pool (it is made again on next use)."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def flush(self, timeout: float = EXIT_WAIT) -> bool:
        """Wait until the jobs this process's committed transactions enqueued
        have been published by the fast path (or left to the relay, where the
        broker would not take them); False if ``timeout`` seconds passed first.

        A process waits for its publishing thread as it exits (up to five
        seconds); a script or test that must see a job published before it
        goes on calls this."""
        return self.sender.flush(timeout)

    def session_scope(self) -> ContextManager[orm.Session]:
        """A session of its own on the worker engine, for scripts: commits on
        success, rolls back on error, closes."""
        return session_scope(self.engine)

    def prune(self, session: orm.Session | None = None) -> int:
        """Delete the jobs that finished more than ``retention_days`` ago
        (every tenant's), and the audit trail's entries older than that
        (:mod:`proj.jobs.audit`); how many jobs.

        Without ``session``, the jobs go in batches of 5,000 (``PRUNE_BATCH``),
        each committed on its own on the worker engine: a million rows never
        make one long transaction, nor hold up the enqueues meanwhile. With
        ``session``, all of it in that session's one transaction (a small
        ledger, or a test)."""
        cutoff = utcnow() - timedelta(days=self.settings.retention_days)
        if session is not None:
            context.scope_system(session.connection())  # every tenant's jobs
            audit.prune(session, cutoff)
            return ledger.prune(session, cutoff)
        with system_session(self.engine) as audit_session:
            audit.prune(audit_session, cutoff)
        deleted = 0
        while True:
            with self.engine.connect() as connection, connection.begin():
                context.scope_system(connection)
                done = ledger.prune_batch(connection, cutoff, PRUNE_BATCH)
                if done < PRUNE_BATCH:
                    ledger.prune_rate_starts(connection)
            deleted += done
            if done < PRUNE_BATCH:
                return deleted

    def init_app(self, flask_app: Flask, db: SQLAlchemy) -> None:
        """Use ``flask_app`` and its Flask-SQLAlchemy ``db`` here.

        - ``delay_on_commit`` in a view joins ``db.session``'s transaction;
        - tasks run inside ``flask_app``'s context (``current_app``, its
          config), and inside a task ``db.session`` is the run's own session;
        - the web pool gets proj's connection hooks (fork safety, a ping for
          connections that rested).

        The job API is a blueprint to mount where you like:
        ``flask_app.register_blueprint(proj.jobs.api.blueprint, url_prefix="/api/jobs")``.
        """
        flask_app.extensions[EXTENSION_KEY] = self
        self.flask_app, self.flask_db = flask_app, db
        for observer in OBSERVERS:
            observer.init_app(self, flask_app)
        with flask_app.app_context():
            for engine in db.engines.values():
                prepare_engine(engine, role="web")

    @contextmanager
    def run_context(self) -> Iterator[None]:
        """Where a task run happens: in the Flask app's context (a new one, so
        the caller's ``db.session`` is not the run's), with ``db.session``
        resolving to the run's session. Nothing without ``init_app``."""
        if self.flask_app is None or self.flask_db is None:
            yield
            return
        with self.flask_app.app_context():
            # A plain Session stands in for Flask-SQLAlchemy's: the run's own.
            self.flask_db.session.registry.set(self.session())  # type: ignore[arg-type]
            try:
                yield
            finally:
                self.flask_db.session.registry.clear()

    def callers_session(self) -> orm.Session | None:
        """The request's ``db.session`` while a request of the Flask app given
        to ``init_app`` is in progress, else None."""
        if self.flask_db is None or not has_app_context():
            return None
        if current_flask_app.extensions.get(EXTENSION_KEY) is not self:
            return None
        return self.flask_db.session()

    def _install(self) -> None:
        app = self.celery_app
        install(app, self)
        self._resolve_result_backend_variable()
        app.steps["worker"].add(RelayStep)
        app.steps["worker"].add(HeartbeatStep)
        app.task(name=RECONCILE_TASK, base=SqlAlchemyTask, bind=True, shared=False)(reconcile_jobs)
        if app.configured:  # type: ignore[attr-defined]
            self._configure(app)
        else:
            app.on_after_configure.connect(self._configure, weak=False)
        outbox.listen_for_commits()
        context.install()
        revoke.install()
        plain_canvas.install(app)
        for observer in OBSERVERS:
            observer.install(self)
        if self.settings.embedded:
            # A prefork worker's children must be able to write SQLite files:
            # no fork while another thread of the process uses one.
            sqlite_forks.install_fork_gate()
        signals.worker_process_init.connect(self._forget_parent_connections)
        signals.worker_init.connect(self._before_worker_starts)
        signals.beat_init.connect(self._refuse_bad_configuration)
        signals.import_modules.connect(self._make_schedule_folder)
        signals.worker_shutdown.connect(self._dispose_on_shutdown)
        signals.task_unknown.connect(self._record_unknown)
        signals.task_rejected.connect(self._record_rejected)

    def _configure(self, sender: Any = None, **_: Any) -> None:
        """Once the app's configuration is read: proj's consumer and scheduler
        unless the app names its own, the reconciler on beat's schedule, and
        the driver proj ships in a database result backend's URL."""
        conf = self.celery_app.conf
        backend = conf.result_backend
        if isinstance(backend, str) and not os.environ.get(RESULT_BACKEND_VARIABLE):
            with suppress(ConfigurationError):  # the start-up check reports it
                conf.update(result_backend=resolve_result_backend(backend))
        if conf.worker_consumer == DEFAULT_CONSUMER:
            conf.worker_consumer = "proj.jobs.deadletter:RecordingConsumer"
        if conf.beat_scheduler == DEFAULT_SCHEDULER:
            conf.beat_scheduler = "proj.jobs.scheduler:SlotScheduler"
        schedule = dict(conf.beat_schedule or {})
        if all(entry.get("task") != RECONCILE_TASK for entry in schedule.values()):
            every = timedelta(seconds=self.settings.reconcile_interval)
            schedule["proj-reconcile-jobs"] = {"task": RECONCILE_TASK, "schedule": every}
        conf.beat_schedule = schedule
        if not conf.worker_soft_shutdown_timeout:
            conf.worker_soft_shutdown_timeout = self.settings.shutdown_grace
        if str(conf.broker_url or "").startswith(("sqla+sqlite", "sqlite")):
            sqlite_forks.install_fork_gate()

    @staticmethod
    def _resolve_result_backend_variable() -> None:
        # Celery reads the variable (where its CLI's --result-backend lands too)
        # before its settings, and without loading them: only the variable can
        # change what it says, and it must change now.
        given = os.environ.get(RESULT_BACKEND_VARIABLE)
        if given:
            with suppress(ConfigurationError):  # the start-up check reports it
                os.environ[RESULT_BACKEND_VARIABLE] = resolve_result_backend(given)

    def _mine(self, sender: Any) -> bool:
        return getattr(sender, "app", sender) is self.celery_app

    def _forget_parent_connections(self, **_: Any) -> None:
        # A forked child drops the inherited pool without closing the
        # parent's sockets; a connection opened in another process is never used.
        if self._engine is not None:
            self._engine.dispose(close=False)

    def _before_worker_starts(self, sender: Any, **_: Any) -> None:
        if not self._mine(sender):
            return
        # Celery's thread pool gives a run the machine's name, not the node's.
        self.node = str(sender.hostname)
        self.limits_left_to_us = get_implementation(sender.pool_cls) is ThreadTaskPool
        # Before the pool forks and the relay thread starts: a child forked while
        # another thread configures the mappers would wait for their lock forever.
        orm.configure_mappers()
        self._refuse_bad_configuration(sender)

    def _refuse_bad_configuration(self, sender: Any, **_: Any) -> None:
        if not self._mine(sender):
            return
        try:
            check_configuration(self.celery_app)
        except ConfigurationError as exc:
            # Celery logs and swallows a receiver's Exception; SystemExit stops it.
            raise SystemExit(f"proj: {exc}") from exc

    def _make_schedule_folder(self, sender: Any, **_: Any) -> None:
        # Sent as worker and beat start, before beat opens its schedule file
        # (beat_init comes after that, too late to make the folder).
        if sender is self.celery_app:
            Path(sender.conf.beat_schedule_filename).parent.mkdir(parents=True, exist_ok=True)

    def _dispose_on_shutdown(self, sender: Any = None, **_: Any) -> None:
        if self._mine(sender):
            self.dispose()

    def _record_unknown(self, sender: Any, message: Message, exc: BaseException, **_: Any) -> None:
        if self._mine(sender):
            record_message(self.engine, message, "unknown-task", exc)

    def _record_rejected(
        self, sender: Any, message: Message, exc: BaseException | None, **_: Any
    ) -> None:
        if self._mine(sender):
            record_message(self.engine, message, "rejected", exc)
