"""proj.jobs's commands, click groups to add to your own CLI
(``flask_app.cli.add_command(proj.jobs.cli.jobs)``; the reference
application's ``proj jobs``, ``proj admin`` and ``proj token``).

Each works on the ledger's database: ``ctx.meta[DATABASE_URL]`` where the
application's command put it there, else the ``DATABASE_URL`` variable. What
changes an account, a token, a job or a queue is recorded in the audit trail
(:mod:`proj.jobs.audit`) in the change's transaction, by the actor ``cli``.

The ``jobs`` group's operator commands (``list``, ``show``, ``retry``,
``cancel``, ``stats``, ``pause``, ``resume``, ``queues``) are
:mod:`proj.jobs.cli_jobs`'s; they route, publish and announce through the
application's installation (``ctx.meta[INSTALLATION]``).
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from typing import Any

import click
from sqlalchemy.engine import make_url

from proj.jobs import audit, auth, cli_jobs, migrations
from proj.jobs.cli_base import DATABASE_URL, INSTALLATION, database_url
from proj.jobs.cli_base import ledger_session as _ledger_session
from proj.jobs.cli_base import record as _record

__all__ = ["DATABASE_URL", "INSTALLATION", "admin", "jobs", "token"]

ROLE = click.Choice([role.value for role in auth.Role])


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A length of time as ``90d``, ``12h`` or ``30m``."""

    name = "duration"
    UNITS = {"d": "days", "h": "hours", "m": "minutes"}

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        count, unit = text[:-1], text[-1:]
        if unit not in self.UNITS or not count.isascii() or not count.isdigit():
            self.fail(f"{value!r} is not a duration such as 90d, 12h or 30m", param, ctx)
        if int(count) == 0:
            self.fail(f"{value!r}: a token that expires at once opens nothing", param, ctx)
        return timedelta(**{self.UNITS[unit]: int(count)})


DURATION = Duration()


@click.group()
def jobs() -> None:
    """The job ledger."""


@jobs.command()
def upgrade() -> None:
    """Migrate the job ledger on DATABASE_URL (its own tables and version
    table only; safe to run again)."""
    url = database_url()
    migrations.upgrade(url)
    shown = make_url(url).render_as_string(hide_password=True)
    click.echo(f"job ledger on {shown} is up to date")


for _command in cli_jobs.COMMANDS:
    jobs.add_command(_command)


@click.group()
def admin() -> None:
    """Console accounts."""


@admin.command("add")
@click.argument("email")
@click.option("--role", type=ROLE, required=True, help="viewer reads; operator also acts")
def add_account(email: str, role: str) -> None:
    """Add a console account. The password is read from standard input when
    it is not a terminal, and prompted for (twice) when it is."""
    with _ledger_session() as session:
        added = auth.add_account(session, email, _read_password(), role).email
        _record(session, audit.Action.ACCOUNT_ADD, added, role=role)
    click.echo(f"account {added} ({role}) added")


@admin.command("password")
@click.argument("email")
def set_password(email: str) -> None:
    """Give an account a new password (read as ``admin add`` reads it); its
    console sessions end."""
    with _ledger_session() as session:
        changed = auth.set_password(session, email, _read_password()).email
        _record(session, audit.Action.ACCOUNT_PASSWORD, changed)
    click.echo(f"account {changed}: password changed; its sessions have ended")


@admin.command("remove")
@click.argument("email")
def remove_account(email: str) -> None:
    """Remove an account; its console sessions end with it."""
    removed = email.strip().lower()
    with _ledger_session() as session:
        auth.remove_account(session, removed)
        _record(session, audit.Action.ACCOUNT_REMOVE, removed)
    click.echo(f"account {removed} removed")


def _read_password() -> str:
    if sys.stdin.isatty():
        password: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        return password
    return sys.stdin.readline().rstrip("\r\n")


@click.group()
def token() -> None:
    """API tokens (requests send Authorization: Bearer <token>)."""


@token.command("add")
@click.argument("name")
@click.option("--role", type=ROLE, required=True, help="viewer reads; operator also writes")
@click.option(
    "--tenant", help="the tenant whose rows its requests see and make (default: rows of none)"
)
@click.option(
    "--expires",
    type=DURATION,
    help="how long until it opens nothing: 90d, 12h, 30m (default: never)",
)
def add_token(name: str, role: str, tenant: str | None, expires: timedelta | None) -> None:
    """Make a token; it is printed once, on the last line, and only its hash is kept."""
    with _ledger_session() as session:
        made = auth.add_token(session, name, role, tenant, expires)
        seconds = int(expires.total_seconds()) if expires is not None else None
        _record(
            session,
            audit.Action.TOKEN_ADD,
            name.strip(),
            role=role,
            tenant=tenant,
            expires_in_seconds=seconds,
        )
    scope = f", tenant {tenant}" if tenant else ""
    click.echo(f"token {name} ({role}{scope}) added; keep it now, it is not shown again:")
    click.echo(made)


@token.command("list")
def list_tokens() -> None:
    """The tokens: name, role, tenant, last use and expiry (never the token)."""
    with _ledger_session() as session:
        rows = [
            (
                found.name,
                found.role,
                found.tenant or "-",
                _when(found.last_used_at, "never used"),
                _when(found.expires_at, "never expires"),
            )
            for found in auth.tokens(session)
        ]
    for row in [("name", "role", "tenant", "last used", "expires"), *rows]:
        click.echo("  ".join(row))


def _when(moment: datetime | None, otherwise: str) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else otherwise


@token.command("revoke")
@click.argument("name")
def revoke_token(name: str) -> None:
    """Revoke the token named NAME: requests with it get 401 from now on."""
    with _ledger_session() as session:
        if not auth.revoke_token(session, name):
            raise click.ClickException(f"no token named {name!r}")
        _record(session, audit.Action.TOKEN_REVOKE, name.strip())
    click.echo(f"token {name} revoked")
