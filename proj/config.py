"""The reference application's settings, read from the environment in one place
(proj.jobs's own are in :class:`~proj.jobs.JobsSettings`, read here too).

With nothing set, proj runs embedded: SQLite files under ``PROJ_DATA_DIR``,
kombu's SQLAlchemy transport on SQLite as the broker and the database as the
result backend. Setting ``DATABASE_URL`` and ``CELERY_BROKER_URL`` switches to
PostgreSQL and RabbitMQ or Redis with no code change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import limits

from proj.jobs import MAX_PRIORITY, ConfigurationError, JobsSettings, login_limit
from proj.jobs.engine import resolve_result_backend
from proj.jobs.settings import number

DEFAULTS: Mapping[str, str] = {
    "PROJ_DATA_DIR": "proj-data",
    "DATABASE_URL": "sqlite:///{data_dir}/proj.sqlite3",
    "CELERY_BROKER_URL": "sqla+sqlite:///{data_dir}/broker.sqlite3",
    "CELERY_RESULT_BACKEND": "db+{database_url}",
    "PROJ_WEB_POOL_SIZE": "5",
    "PROJ_WEB_STATEMENT_TIMEOUT": "5",
    "PROJ_WEB_ANSWER_WITHIN": "8",
    "PROJ_MAIL_URL": "file://{data_dir}/mail",
    "PROJ_MAIL_FROM": "proj@localhost",
    "PROJ_DIGEST_TO": "ops@localhost",
    "SECRET_KEY": "",
    "PROJ_COOKIE_SECURE": "",
    "PROJ_LOGIN_RATE_LIMIT": "10/minute",
    "PROJ_SESSION_IDLE_TIMEOUT": "3600",
    "PROJ_SESSION_LIFETIME": "43200",
    "PROJ_RATELIMIT_STORAGE_URI": "auto",
    "PROJ_TRUSTED_PROXIES": "0",
    "PROJ_MAX_CONTENT_LENGTH": "65536",
    "PROJ_PAYMENT_LATENCY": "0",
    "PROJ_CLEANUP_INTERVAL": "3600",
    "PROJ_DIGEST_INTERVAL": "86400",
    "PROJ_BROKER_POLL_INTERVAL": "0.005",
    "PROJ_VISIBILITY_TIMEOUT": "7200",
    "PROJ_TASK_TIME_LIMIT": "900",
}
"""The default of every setting, by environment variable. ``{data_dir}`` and
``{database_url}`` expand to the values in effect."""

SQLITE_BROKER_PREFIXES = ("sqla+sqlite:", "sqlalchemy+sqlite:")


@dataclass(frozen=True)
class Settings:
    """proj's configuration. Build it with :func:`load_settings`."""

    data_dir: Path
    """The embedded setup's folder: its SQLite files, the mail folder, beat's
    schedule file and the secret key it makes."""
    broker_url: str
    """Celery's broker: RabbitMQ (``amqp://``), Redis (``redis://``) or the
    embedded SQLite broker (``sqla+sqlite://``)."""
    result_backend: str
    """Where Celery stores the results of tasks that keep them: by default the
    database (``db+`` its URL; on SQLite, a file of its own), with the driver
    proj ships. Ledger jobs keep theirs in their row."""
    web_pool_size: int
    """Connections in the web tier's pool (Flask-SQLAlchemy's engine)."""
    web_statement_timeout: float
    """Seconds a request's statement may run before PostgreSQL cancels it (the
    request answers 503)."""
    web_answer_within: float
    """Seconds a request waits for PostgreSQL to answer at all before it gives
    up on the connection and answers 503 (0: as long as TCP allows)."""
    mail_url: str
    """``smtp://host:port`` or ``file:///folder`` (one ``.eml`` file a message)."""
    mail_from: str
    """The ``From`` address of the mails proj sends."""
    digest_to: str
    """Where ``send_digest`` mails its summary."""
    secret_key: str
    """Signs the console's session cookies and CSRF tokens; required outside
    the embedded setup (see :func:`proj.web.app.secret_key`)."""
    cookie_secure: bool
    """Session cookies only over HTTPS (default: outside the embedded setup)."""
    login_rate_limit: str
    """Console sign-in attempts allowed per client address, and per account
    tried, in any window of that length (``10/minute``)."""
    session_idle_timeout: float
    """Seconds a console session may go without a request before it ends."""
    session_lifetime: float
    """Seconds a console session lasts at most after sign-in, however busy."""
    ratelimit_storage_uri: str
    """Where sign-in attempts are counted: ``database`` (the ledger's table),
    ``redis://...`` or ``memory://`` (each process its own). ``auto``: the
    broker's Redis when the broker is Redis, else the database, but
    ``memory://`` on the embedded setup (one web process)."""
    trusted_proxies: int
    """How many proxies in front of the web tier append the client's address
    to ``X-Forwarded-For``; the client address is the one the outermost of
    them saw (Werkzeug's ``ProxyFix``). 0: none, the socket's peer, and the
    header is ignored."""
    max_content_length: int
    """Largest request body the API accepts, in bytes; larger ones get 413."""
    payment_latency: float
    """Seconds the default payment gateway takes per charge, as a real one would."""
    cleanup_interval: float
    """Seconds between beat's runs of ``cleanup_expired`` (which deletes jobs
    finished more than ``PROJ_RETENTION_DAYS`` ago)."""
    digest_interval: float
    """Seconds between beat's runs of ``send_digest``, and the period it sums up."""
    broker_poll_interval: float
    """Seconds between polls of the embedded SQLite broker."""
    visibility_timeout: float
    """Seconds Redis waits before redelivering an unacknowledged message."""
    task_time_limit: float
    """The hard time limit of every task that sets none of its own, in
    seconds (Celery's ``task_time_limit``; 0: none). The prefork pool kills
    a child past it; the threads pool of the embedded setup (``proj run``)
    does not enforce it (celery#9203)."""
    jobs: JobsSettings
    """proj.jobs's settings (the database, pools, relay, reconciler, attempts)."""

    @property
    def database_url(self) -> str:
        """The application's database, where the job ledger lives too."""
        return self.jobs.database_url

    @property
    def embedded(self) -> bool:
        """True when the database is SQLite (the no-servers setup)."""
        return self.database_url.startswith("sqlite")

    def celery_connection(self) -> dict[str, Any]:
        """The Celery settings that depend on the environment: where the broker
        and results live, and the tasks' hard time limit."""
        conf: dict[str, Any] = {
            "broker_url": self.broker_url,
            "result_backend": self.result_backend,
            # No task runs for ever: past its hard time limit (its own, else
            # this) the prefork pool kills its child and the attempt ends.
            "task_time_limit": self.task_time_limit or None,
        }
        # On RabbitMQ none: celeryconfig's own, if any, stay (confirm_publish, say).
        if self.broker_url.startswith(SQLITE_BROKER_PREFIXES):
            # kombu hands every transport option to create_engine, so the
            # polling interval cannot be set there; proj's subclass sets it.
            conf["broker_url"] = self.broker_url.split("+", 1)[1]
            conf["broker_transport"] = "proj.jobs.sqlite_broker:SQLiteTransport"
            conf["broker_transport_options"] = {"polling_interval": self.broker_poll_interval}
        elif self.broker_url.startswith(("redis:", "rediss:")):
            conf["broker_transport_options"] = {
                "visibility_timeout": self.visibility_timeout,
                # A list a priority, read from 0 up (kombu's 4 by default).
                "priority_steps": list(range(MAX_PRIORITY + 1)),
            }
        return conf


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``environ`` (default: ``os.environ``).

    Raises :class:`ConfigurationError` naming the variable whose value is not valid.
    """
    env = os.environ if environ is None else environ

    def raw(name: str) -> str:
        return env.get(name) or DEFAULTS[name]

    data_dir = Path(raw("PROJ_DATA_DIR")).expanduser().resolve()
    # With the driver proj ships: every URL derived from it gets it too.
    jobs = JobsSettings.from_environ(
        env, database_url=raw("DATABASE_URL").format(data_dir=data_dir)
    )
    database_url = jobs.database_url

    def text(name: str) -> str:
        return raw(name).format(data_dir=data_dir, database_url=database_url)

    def read(name: str, kind: type[int] | type[float]) -> Any:
        return number(name, raw(name), kind)

    def rate(name: str) -> str:
        try:
            limits.parse(raw(name))
        except ValueError:
            raise ConfigurationError(
                f"{name} must be a rate such as 10/minute, not {raw(name)!r}"
            ) from None
        return raw(name)

    def store(name: str) -> str:
        uri = raw(name).strip()
        broker = text("CELERY_BROKER_URL")
        if uri == "auto":
            # Kombu's Redis URLs are redis-py's, which limits hands them to.
            redis = broker.startswith(("redis:", "rediss:"))
            uri = broker if redis else login_limit.default_store(database_url)
        try:
            return login_limit.check_store(uri)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{name}: {exc}") from None

    def flag(name: str, default: bool) -> bool:
        value = raw(name).strip().lower()
        if value in ("", "auto"):
            return default
        if value not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigurationError(f"{name} must be 1 or 0, not {value!r}")
        return value in ("1", "true", "yes")

    result_backend = text("CELERY_RESULT_BACKEND")
    if database_url.startswith("sqlite") and not env.get("CELERY_RESULT_BACKEND"):
        # SQLite has one writer at a time: results get a file of their own.
        result_backend = f"db+sqlite:///{data_dir}/results.sqlite3"
    try:
        result_backend = resolve_result_backend(result_backend)
    except ConfigurationError as exc:
        raise ConfigurationError(f"CELERY_RESULT_BACKEND: {exc}") from None
    return Settings(
        data_dir=data_dir,
        broker_url=text("CELERY_BROKER_URL"),
        result_backend=result_backend,
        web_pool_size=read("PROJ_WEB_POOL_SIZE", int),
        web_statement_timeout=read("PROJ_WEB_STATEMENT_TIMEOUT", float),
        web_answer_within=read("PROJ_WEB_ANSWER_WITHIN", float),
        mail_url=text("PROJ_MAIL_URL"),
        mail_from=text("PROJ_MAIL_FROM"),
        digest_to=text("PROJ_DIGEST_TO"),
        secret_key=raw("SECRET_KEY"),
        cookie_secure=flag("PROJ_COOKIE_SECURE", not database_url.startswith("sqlite")),
        login_rate_limit=rate("PROJ_LOGIN_RATE_LIMIT"),
        session_idle_timeout=read("PROJ_SESSION_IDLE_TIMEOUT", float),
        session_lifetime=read("PROJ_SESSION_LIFETIME", float),
        ratelimit_storage_uri=store("PROJ_RATELIMIT_STORAGE_URI"),
        trusted_proxies=read("PROJ_TRUSTED_PROXIES", int),
        max_content_length=read("PROJ_MAX_CONTENT_LENGTH", int),
        payment_latency=read("PROJ_PAYMENT_LATENCY", float),
        cleanup_interval=read("PROJ_CLEANUP_INTERVAL", float),
        digest_interval=read("PROJ_DIGEST_INTERVAL", float),
        broker_poll_interval=read("PROJ_BROKER_POLL_INTERVAL", float),
        visibility_timeout=read("PROJ_VISIBILITY_TIMEOUT", float),
        task_time_limit=read("PROJ_TASK_TIME_LIMIT", float),
        jobs=jobs,
    )


_current: Settings | None = None


def current_settings() -> Settings:
    """The settings in effect in this process (read from the environment once)."""
    global _current
    if _current is None:
        _current = load_settings()
    return _current


def use_settings(settings: Settings) -> None:
    """Make ``settings`` the ones in effect (tests pointing the application at a stack)."""
    global _current
    _current = settings
