"""``jobs``: proj.jobs's commands, a click group to add to your own CLI
(``flask_app.cli.add_command(proj.jobs.cli.jobs)``; the reference application's
``proj jobs``)."""

from __future__ import annotations

import click
from sqlalchemy.engine import make_url

from proj.jobs import migrations
from proj.jobs.engine import resolve_url
from proj.jobs.errors import ConfigurationError
from proj.jobs.settings import JobsSettings


@click.group()
def jobs() -> None:
    """The job ledger."""


@jobs.command()
def upgrade() -> None:
    """Migrate the job ledger on DATABASE_URL (its own tables and version
    table only; safe to run again)."""
    try:
        url = resolve_url(JobsSettings.from_environ().database_url)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    migrations.upgrade(url)
    shown = make_url(url).render_as_string(hide_password=True)
    click.echo(f"job ledger on {shown} is up to date")
