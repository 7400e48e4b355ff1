"""proj.jobs's commands, click groups to add to your own CLI
(``flask_app.cli.add_command(proj.jobs.cli.jobs)``; the reference
application's ``proj jobs``, ``proj admin`` and ``proj token``).

Each works on the ledger's database: ``ctx.meta[DATABASE_URL]`` where the
application's command put it there, else the ``DATABASE_URL`` variable.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy import create_engine, orm, pool
from sqlalchemy.engine import make_url

from proj.jobs import auth, migrations
from proj.jobs.engine import resolve_url
from proj.jobs.errors import ConfigurationError
from proj.jobs.session import session_scope
from proj.jobs.settings import JobsSettings

ROLE = click.Choice([role.value for role in auth.Role])
DATABASE_URL = "proj.jobs.database_url"
"""The key of ``click`` context's ``meta`` an application's command may set."""


def _database_url() -> str:
    given = click.get_current_context().meta.get(DATABASE_URL)
    try:
        return resolve_url(given or JobsSettings.from_environ().database_url)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _ledger_session() -> Iterator[orm.Session]:
    """A session on the ledger that commits if the command succeeds; an
    :class:`~proj.jobs.auth.AuthError` becomes the command's error message."""
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    try:
        with session_scope(engine) as session:
            yield session
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()


@click.group()
def jobs() -> None:
    """The job ledger."""


@jobs.command()
def upgrade() -> None:
    """Migrate the job ledger on DATABASE_URL (its own tables and version
    table only; safe to run again)."""
    url = _database_url()
    migrations.upgrade(url)
    shown = make_url(url).render_as_string(hide_password=True)
    click.echo(f"job ledger on {shown} is up to date")


@click.group()
def admin() -> None:
    """Console accounts."""


@admin.command("add")
@click.argument("email")
@click.option("--role", type=ROLE, required=True, help="viewer reads; operator also acts")
def add_account(email: str, role: str) -> None:
    """Add a console account. The password is read from standard input when
    it is not a terminal, and prompted for (twice) when it is."""
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    with _ledger_session() as session:
        added = auth.add_account(session, email, password, role).email
    click.echo(f"account {added} ({role}) added")


@click.group()
def token() -> None:
    """API tokens (requests send Authorization: Bearer <token>)."""


@token.command("add")
@click.argument("name")
@click.option("--role", type=ROLE, required=True, help="viewer reads; operator also writes")
@click.option(
    "--tenant", help="the tenant whose rows its requests see and make (default: rows of none)"
)
def add_token(name: str, role: str, tenant: str | None) -> None:
    """Make a token; it is printed once, on the last line, and only its hash is kept."""
    with _ledger_session() as session:
        made = auth.add_token(session, name, role, tenant)
    scope = f", tenant {tenant}" if tenant else ""
    click.echo(f"token {name} ({role}{scope}) added; keep it now, it is not shown again:")
    click.echo(made)


@token.command("revoke")
@click.argument("name")
def revoke_token(name: str) -> None:
    """Revoke the token named NAME: requests with it get 401 from now on."""
    with _ledger_session() as session:
        if not auth.revoke_token(session, name):
            raise click.ClickException(f"no token named {name!r}")
    click.echo(f"token {name} revoked")
