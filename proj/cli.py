"""The ``proj`` command: ``proj run``, ``proj db upgrade``,
``proj jobs upgrade|list|show|retry|cancel|stats``,
``proj admin add|password|remove``, ``proj token add|list|revoke``,
``proj relay``, ``proj check``.

Importing it loads click alone: each command imports what it runs when it
runs, so ``proj --help`` and ``proj --version`` answer at once. A setting
that is not valid ends any command with one line naming it, and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from proj.config import Settings
    from proj.jobs import Jobs

CONFIGURATION_ERROR = 2
"""The exit status of a command refused for a setting that is not valid."""
LIBRARY_COMMANDS = {
    "admin": ("proj.jobs.cli:admin", "Console accounts."),
    "jobs": ("proj.jobs.cli:jobs", "The job ledger."),
    "token": ("proj.jobs.cli:token", "API tokens (requests send Authorization: Bearer <token>)."),
}
"""proj.jobs's command groups, each loaded when it is used: where it is, and
its help line (what ``proj --help`` shows without loading it)."""

METRICS_PORT = "PROJ_METRICS_PORT"
"""The setting only ``proj run``'s worker gets: one process may listen on a port."""
STOP_TIMEOUT = 20.0
"""Seconds ``proj run`` waits for its processes to stop before killing them."""

logger = logging.getLogger(__name__)


def _say(message: str, *, err: bool = False) -> None:
    """A command's message: printed, or a log line when the logs are JSON."""
    from proj.jobs import logs

    if logs.writes_json():
        logger.log(logging.WARNING if err else logging.INFO, message.strip())
    else:
        click.echo(message, err=err)


class ProjCommands(click.Group):
    """proj's commands: :data:`LIBRARY_COMMANDS` loaded when used, and a
    :class:`~proj.jobs.ConfigurationError` turned into one line on standard
    error and exit status :data:`CONFIGURATION_ERROR`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LIBRARY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LIBRARY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, _, name = LIBRARY_COMMANDS[cmd_name][0].partition(":")
        command: click.Command = getattr(importlib.import_module(module), name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LIBRARY_COMMANDS:
                rows.append((name, LIBRARY_COMMANDS[name][1]))
            else:
                command = self.commands[name]
                rows.append((name, command.get_short_help_str(formatter.width - len(name) - 6)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from proj.jobs import ConfigurationError

        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            click.echo(f"proj: {exc}", err=True)
            ctx.exit(CONFIGURATION_ERROR)


@click.group(cls=ProjCommands)
@click.version_option(package_name="proj", prog_name="proj")
@click.pass_context
def main(ctx: click.Context) -> None:
    """proj: background work for Flask + SQLAlchemy on Celery."""
    from proj.config import current_settings
    from proj.jobs.cli import DATABASE_URL, INSTALLATION

    ctx.meta[DATABASE_URL] = current_settings().database_url
    ctx.meta[INSTALLATION] = _installation


def _installation() -> Jobs:
    """proj's Celery app's installation, for ``proj jobs``: its broker, its
    routes and its tasks (imported only by the commands that use it)."""
    import proj.tasks  # noqa: F401  (the queue filter routes the tasks the app knows)
    from proj.celery import app as celery_app
    from proj.jobs import Jobs

    return Jobs.of(celery_app)


@main.group()
def db() -> None:
    """The application database."""


@db.command()
def upgrade() -> None:
    """Migrate the database (the job ledger, then the application's tables)
    to the newest schema (safe to run again)."""
    from sqlalchemy.engine import make_url

    from proj.config import current_settings
    from proj.migrations import upgrade as upgrade_database

    upgrade_database()
    url = make_url(current_settings().database_url)
    click.echo(f"database {url.render_as_string(hide_password=True)} is up to date")


@main.command()
def relay() -> None:
    """Publish committed jobs the fast path missed, until Ctrl-C or SIGTERM."""
    import threading

    from proj.celery import app as celery_app
    from proj.jobs import Jobs, logs
    from proj.jobs.relay import make_relay

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    logs.start(Jobs.of(celery_app).settings)
    relay = make_relay(celery_app)
    database = relay.engine.url.render_as_string(hide_password=True)
    _say(f"proj relay: publishing the jobs {database} owes the broker")
    relay.relay(stop)
    relay.engine.dispose()
    _say(f"proj relay: stopped after publishing {relay.published} jobs")


def _hide_password(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


@main.command()
def check() -> None:
    """Check the configuration, the database and the broker; exit 1 on a problem."""
    from sqlalchemy import text

    from proj.celery import app as celery_app
    from proj.config import current_settings
    from proj.jobs import ConfigurationError, Jobs
    from proj.jobs.checks import check_configuration
    from proj.jobs.context import scope_system
    from proj.web.app import secret_key

    settings = current_settings()
    problems = []
    try:
        check_configuration(celery_app)
    except ConfigurationError as exc:
        problems.append(f"configuration: {exc}")
    try:
        with Jobs.of(celery_app).engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            scope_system(connection)  # whether any tenant's job exists
            problems += [f"tenants: {found}" for found in tenant_isolation_problems(connection)]
    except Exception as exc:
        problems.append(f"database: {exc.__class__.__name__}: {exc}")
    try:
        # The key the web tier would use (embedded, the one it keeps in the
        # data folder, which connecting has made).
        secret_key(settings)
    except ConfigurationError as exc:
        problems.append(f"configuration: {exc}")
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        problems.append(f"broker: {exc.__class__.__name__}: {exc}")
    click.echo(f"database: {_hide_password(settings.database_url)}")
    click.echo(f"broker:   {_hide_password(settings.broker_url)}")
    for problem in problems:
        click.echo(f"problem:  {problem}", err=True)
    sys.exit(1 if problems else 0)


def tenant_isolation_problems(connection: Connection) -> list[str]:
    """Why tenants would see each other's rows through ``connection``'s role:
    it bypasses row-level security, owns a tenant table (an owner may switch
    its row-level security off), or row-level security is off on one.
    Nothing where tenants are not used (no API token and no job has one) and
    on databases without row-level security."""
    from sqlalchemy import text

    from proj.jobs import TENANT_LEDGER_TABLES
    from proj.models import TENANT_TABLES

    if connection.dialect.name != "postgresql":
        return []
    if connection.scalar(text("SELECT to_regclass('proj_api_tokens')")) is None:
        return []  # not migrated yet
    in_use = connection.scalar(
        text(
            "SELECT EXISTS (SELECT 1 FROM proj_api_tokens WHERE tenant IS NOT NULL)"
            " OR EXISTS (SELECT 1 FROM jobs WHERE tenant IS NOT NULL)"
        )
    )
    if not in_use:
        return []
    role = connection.execute(
        text(
            "SELECT current_user AS name, rolsuper, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user"
        )
    ).one()
    if role.rolsuper or role.rolbypassrls:
        what = "a superuser" if role.rolsuper else "a BYPASSRLS role"
        return [
            f"{role.name} is {what}: row-level security does not apply, every tenant "
            "sees every row; connect as a role with NOSUPERUSER NOBYPASSRLS"
        ]
    tables = connection.execute(
        text(
            "SELECT relname, relrowsecurity, pg_has_role(relowner, 'USAGE') AS owned"
            " FROM pg_class"
            " WHERE oid IN (SELECT to_regclass(name) FROM unnest(:names) AS name)"
        ),
        {"names": [*TENANT_TABLES, *TENANT_LEDGER_TABLES]},
    )
    return [
        f"row-level security is off on {table.relname}; run proj db upgrade"
        if not table.relrowsecurity
        else f"{role.name} owns {table.relname}, so it may switch its row-level security "
        "off: migrate as an owner role and connect the application as another one "
        "(neither owner, superuser nor BYPASSRLS)"
        for table in tables
        if not table.relrowsecurity or table.owned
    ]


def _commands(host: str, port: int) -> dict[str, list[str]]:
    from proj.jobs import logs

    python = sys.executable
    # Beat prints its banner before any hook could leave it out of JSON logs.
    quiet = ["--quiet"] if logs.writes_json() else []
    return {
        "web": [
            python,
            "-m",
            "flask",
            "--app",
            "proj.web",
            "run",
            "--host",
            host,
            "--port",
            str(port),
        ],
        "worker": [
            python,
            "-m",
            "celery",
            "-A",
            "proj",
            "worker",
            "--loglevel",
            "INFO",
            "--pool",
            "threads",
            "--concurrency",
            "4",
        ],
        "beat": [python, "-m", "celery", "-A", "proj", *quiet, "beat", "--loglevel", "INFO"],
    }


def _wait_for_port(host: str, port: int, processes: dict[str, subprocess.Popen[bytes]]) -> bool:
    """True once something answers on ``port``; False if a process exits or
    a minute passes first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes.values()):
            return False
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    # A second Ctrl-C must not cut the orderly stop short; the timeout below
    # kills whatever does not stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(f"proj: {name} did not stop in time; killing it", err=True)
            process.kill()
            process.wait()


FIRST_OPERATOR = "admin@localhost"
FIRST_TOKEN = "proj-run"  # noqa: S105  (the token's name, not a secret)


def _first_access(settings: Settings) -> tuple[str, str] | None:
    """When the database has no console account yet: an operator account
    (:data:`FIRST_OPERATOR`) and an operator API token, made now (and
    recorded in the audit trail); their password and token, to be shown
    once. None when accounts exist."""
    import secrets

    from sqlalchemy import create_engine, pool

    from proj.jobs import audit, auth
    from proj.jobs.session import session_scope

    engine = create_engine(settings.database_url, poolclass=pool.NullPool)
    try:
        with session_scope(engine) as session:
            if auth.has_accounts(session):
                return None
            password = secrets.token_urlsafe(12)
            auth.add_account(session, FIRST_OPERATOR, password, auth.Role.OPERATOR)
            auth.revoke_token(session, FIRST_TOKEN)
            token = auth.add_token(session, FIRST_TOKEN, auth.Role.OPERATOR)
            made = {"role": auth.Role.OPERATOR, "command": "proj run"}
            for action, target in (
                (audit.Action.ACCOUNT_ADD, FIRST_OPERATOR),
                (audit.Action.TOKEN_ADD, FIRST_TOKEN),
            ):
                audit.record(session, action, actor=audit.CLI, target=target, detail=made)
            return password, token
    finally:
        engine.dispose()


def _welcome(url: str, mail_url: str, first_access: tuple[str, str] | None) -> str:
    token = first_access[1] if first_access else "<token from: proj token add NAME --role operator>"
    lines = [
        f"\nproj is running: open {url}",
        f"  console:  {url}dashboard/",
    ]
    if first_access:
        lines.append(f"            sign in as {FIRST_OPERATOR} with password {first_access[0]}")
        lines.append(f"  API token (operator): {token}")
        lines.append("            shown this once; make more with proj token add, proj admin add")
    lines += [
        f"  sign up:  curl -X POST -H 'Authorization: Bearer {token}' "
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"email": "ada@example.com"}}\' {url}api/users',
        f"  mail:     {mail_url}",
        "Press Ctrl-C to stop.\n",
    ]
    return "\n".join(lines)


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keep_private(folder: Path) -> None:
    """The embedded data folder, and all in it, readable by its owner only: it
    holds password and token hashes, job arguments and mail. What is made
    from now on is made so (umask 077, which the processes ``proj run``
    starts inherit); what was made before is made so now."""
    os.umask(0o077)
    folder.mkdir(parents=True, exist_ok=True)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True)
def run(host: str, port: int) -> None:
    """Upgrade the database and run web, worker and beat until Ctrl-C."""
    from proj.config import current_settings
    from proj.jobs import logs
    from proj.migrations import upgrade as upgrade_database

    settings = current_settings()
    if settings.embedded:
        _keep_private(settings.data_dir)
    logs.start(settings.jobs)
    if not settings.cookie_secure and not _loopback(host):
        _say(
            f"proj: serving on {host} over plain HTTP, so the console's session cookies "
            "are not Secure: anyone on the way can read them. Serve proj behind HTTPS "
            "with PROJ_COOKIE_SECURE=1, or keep --host on 127.0.0.1.",
            err=True,
        )
    upgrade_database()
    first_access = _first_access(settings) if settings.embedded else None
    processes: dict[str, subprocess.Popen[bytes]] = {}
    # Ctrl-C reaches the whole process group; SIGTERM from a supervisor only
    # reaches us, so both end up in the same orderly stop. SIGINT's handler is
    # set too: started with it ignored (a script's `proj run &`), Python would
    # keep ignoring it.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        for name, command in _commands(host, port).items():
            # One metrics port a machine: the worker's (beat's jobs are counted
            # where they run, and the web serves its own /metrics).
            env = {k: v for k, v in os.environ.items() if name == "worker" or k != METRICS_PORT}
            # proj's own commands, with this Python: nothing from input.
            processes[name] = subprocess.Popen(command, env=env)  # noqa: S603
        if _wait_for_port(host, port, processes):
            # Printed, never logged: it holds the first password and token.
            click.echo(_welcome(f"http://{host}:{port}/", settings.mail_url, first_access))
        elif all(p.poll() is None for p in processes.values()):
            _say(f"proj: nothing answers on {host}:{port} yet; see the output above", err=True)
        while all(p.poll() is None for p in processes.values()):
            time.sleep(0.5)
        failed = [name for name, p in processes.items() if p.poll() is not None]
        _say(f"proj: {', '.join(failed)} stopped; stopping the rest", err=True)
        _stop(processes)
        sys.exit(1)
    except KeyboardInterrupt:
        _say("\nproj: stopping web, worker and beat")
        _stop(processes)
        _say("proj: stopped")
