"""The ledger's operator commands, ``jobs list|show|retry|cancel|stats``
and ``jobs pause|resume|queues`` (:data:`COMMANDS`, in :mod:`proj.jobs.cli`'s
``jobs`` group). They act on the ledger as the console does, through
:mod:`proj.jobs.actions`, :mod:`proj.jobs.queues` and the console's filters
and bulk actions, on the database directly, so they work while the web tier
is down; they route, publish and announce through the application's
installation (:func:`proj.jobs.cli_base.installation`). Each change is
recorded in the audit trail, by the actor ``cli``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import click
from celery import Celery
from sqlalchemy import func, orm, select

from proj.jobs import actions, audit, queues, revoke
from proj.jobs.cli_base import installation as _installation
from proj.jobs.cli_base import ledger_session as _ledger_session
from proj.jobs.cli_base import record as _record
from proj.jobs.clock import utcnow
from proj.jobs.console import bulk, wording
from proj.jobs.console.filters import (
    FILTER_FIELDS,
    InvalidFilter,
    JobFilter,
    Queues,
    is_job_id,
    named_queue,
)
from proj.jobs.extension import Jobs
from proj.jobs.ledger import attempts_of
from proj.jobs.models import CLAIMABLE, FINISHED, Job, State

UNFINISHED = tuple(state for state in State if state not in FINISHED)
"""The states ``jobs stats`` counts by queue."""
_FILTER_HELP = {
    "state": "jobs in this state",
    "name": "jobs of this task (its name, exactly)",
    "queue": "jobs that go to this queue",
    "tenant": "jobs of this tenant",
    "since": "jobs created at or after this time: 2025-01-31T14:05 (UTC, or its +HH:MM)",
    "until": "jobs created before this time (as --since)",
    "q": "the job with this id, else jobs whose arguments hold this text",
    "canvas": "the steps of this canvas (its id)",
}
"""The help of each of the console's filters (:class:`~proj.jobs.console.filters.JobFilter`)."""


def _filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the console's filters as options, passed to it by name."""
    for field in reversed(FILTER_FIELDS):
        kind = click.Choice([str(state) for state in State]) if field == "state" else None
        command = click.option(f"--{field}", type=kind, help=_FILTER_HELP[field])(command)
    return command


def _read_filter(given: Mapping[str, str | None]) -> JobFilter:
    """The filter the options give; a usage error naming each option whose
    value cannot be used."""
    try:
        return JobFilter.read({field: value for field, value in given.items() if value})
    except InvalidFilter as exc:
        hints = [f"--{field}" for field in exc.problems]
        raise click.BadParameter(str(exc), param_hint=hints) from None


def _job(session: orm.Session, job_id: str) -> Job:
    """The job ``job_id``; the command's error if there is none."""
    found = session.get(Job, job_id) if is_job_id(job_id) else None
    if found is None:
        raise click.ClickException(f"no job with id {job_id}")
    return found


def _table(rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows``, each column as wide as its widest cell."""
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


def _echo_json(document: Mapping[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


_JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="one JSON document instead of text"
)
_YES_OPTION = click.option("--yes", is_flag=True, help="act without asking for confirmation")


@click.command("list")
@_filter_options
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="most jobs listed"
)
@_JSON_OPTION
def list_jobs(limit: int, as_json: bool, **given: str | None) -> None:
    """The jobs the filters match, newest first: id, task, state, attempts,
    creation and tenant; with --json, {"jobs": [...]}, each job as the job
    API shows it."""
    chosen = _read_filter(given)
    routes = Queues(_installation().celery_app)
    with _ledger_session() as session:
        query = (
            select(Job)
            .where(*chosen.conditions(routes, session))
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(limit)
        )
        found = list(session.scalars(query))
        documents = [job.to_json() for job in found]
        rows = [
            (
                job.id,
                job.name,
                job.state,
                f"{job.attempts}/{job.max_attempts}",
                wording.moment(job.created_at),
                job.tenant or "-",
            )
            for job in found
        ]
    if as_json:
        _echo_json({"jobs": documents})
    elif rows:
        _table([("id", "name", "state", "attempts", "created", "tenant"), *rows])
    else:
        click.echo("no job matches")


@click.command()
@click.argument("job_id")
@_JSON_OPTION
def show(job_id: str, as_json: bool) -> None:
    """The job JOB_ID: what it runs, where it stands, and the error of each
    attempt that ended in one (with --json, as the job API shows it, with
    the tracebacks)."""
    with _ledger_session() as session:
        found = _job(session, job_id).to_json()
        errors = [attempt.to_json() for attempt in attempts_of(session, job_id)]
    if as_json:
        _echo_json({**found, "errors": errors})
        return
    _table([(key, _text(value)) for key, value in found.items() if value not in (None, [])])
    if errors:
        click.echo("\nattempts that ended in an error:")
        _table(
            [
                (
                    f"  {error['attempt']}",
                    error["outcome"],
                    error["finished_at"],
                    error["worker"] or "-",
                    error["error"] or "-",
                )
                for error in errors
            ]
        )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _target(job_id: str | None, given: Mapping[str, str | None]) -> str | JobFilter:
    """What a retry or cancel acts on: the job ``job_id``, or every job the
    filter options match; a usage error unless exactly one of them is given."""
    chosen = _read_filter(given)
    if job_id is not None and chosen.args():
        raise click.UsageError("give a job's ID or filter options, not both")
    if job_id is None and not chosen.args():
        raise click.UsageError(
            "give a job's ID, or filter options (--state failed, say) to act on "
            "every job they match"
        )
    return job_id if job_id is not None else chosen


@click.command("retry")
@click.argument("job_id", required=False)
@_filter_options
@_YES_OPTION
def retry_jobs(job_id: str | None, yes: bool, **given: str | None) -> None:
    """Queue the failed job JOB_ID again, or every failed job the filters
    match (counted, then confirmed). Each starts a fresh budget of attempts,
    and is published once the change commits (by the relay, if the broker
    cannot take it now)."""
    target = _target(job_id, given)
    installation = _installation()
    if isinstance(target, JobFilter):
        _act_on_matching("retry", target, installation, yes)
        return
    with _ledger_session() as session:
        try:
            actions.retry(session, installation, _job(session, target))
        except actions.NotActionable as exc:
            raise click.ClickException(str(exc)) from None
        _record(session, audit.Action.JOB_RETRY, target)
    click.echo(f"job {target} is queued again, with a fresh budget of attempts")


@click.command("cancel")
@click.argument("job_id", required=False)
@_filter_options
@_YES_OPTION
def cancel_jobs(job_id: str | None, yes: bool, **given: str | None) -> None:
    """Cancel the job JOB_ID, or every waiting or running job the filters
    match (counted, then confirmed). A waiting job is cancelled at once and
    never runs; a running one is asked to stop, and ends cancelled at its
    next check."""
    target = _target(job_id, given)
    installation = _installation()
    if isinstance(target, JobFilter):
        _act_on_matching("cancel", target, installation, yes)
        return
    with _ledger_session() as session:
        try:
            was = actions.cancel(session, _job(session, target))
        except actions.NotActionable as exc:
            raise click.ClickException(str(exc)) from None
        _record(session, audit.Action.JOB_CANCEL, target, was=was)
    if was == State.RUNNING:
        click.echo(
            f"job {target} is running: it is asked to stop and ends cancelled at its "
            "next check; a job that never checks finishes normally"
        )
        return
    click.echo(f"job {target} is cancelled; it will never run")
    _announce(installation.celery_app, [target])


def _act_on_matching(action: str, chosen: JobFilter, installation: Jobs, yes: bool) -> None:
    """The console's bulk ``action`` on every job ``chosen`` matches: count
    the jobs it applies to, have the count confirmed (unless ``yes``), then
    act on the newest ``bulk.BATCH_LIMIT`` of them, recorded as one entry."""
    selection = bulk.Selection(action, "matching", (), chosen)
    routes = Queues(installation.celery_app)
    with _ledger_session() as session:
        count, capped = selection.count(session, routes)
    which = "failed" if action == "retry" else "waiting or running"
    if not count:
        click.echo(f"no {which} job matches; nothing to {action}")
        return
    matches = "job matches" if count == 1 else "jobs match"
    click.echo(f"{count:,}{'+' if capped else ''} {which} {matches}")
    if capped:
        click.echo(
            f"that is more than one {action} takes: only the newest {bulk.BATCH_LIMIT:,} "
            "are taken; run it again for the rest"
        )
    if not yes:
        click.confirm(f"{action.capitalize()} {'it' if count == 1 else 'them'}?", abort=True)
    with _ledger_session() as session:
        job_ids, capped = selection.pick(session, routes)
        tally = selection.apply(session, installation, job_ids)
        detail = {
            "scope": selection.scope,
            "filter": chosen.args(),
            "picked": len(job_ids),
            "capped": capped,
            "done": tally.done,
            "stopping": tally.stopping,
            "skipped": tally.skipped,
            "unrunnable": tally.unrunnable,
            "job_ids": tally.changed[: bulk.IDS_RECORDED],
        }
        _record(session, bulk.AUDITED[action], _jobs_text(len(tally.changed)), **detail)
    click.echo(selection.summary(tally, len(job_ids), capped, count))
    _announce(installation.celery_app, tally.cancelled)


def _announce(celery_app: Celery, job_ids: Sequence[str]) -> None:
    """Announce jobs cancelled as proj's cancel does (a ``task-revoked``
    event each, :func:`proj.jobs.revoke.announce`) when the broker answers
    at once; else say that it did not: the cancels hold in the ledger."""
    if not job_ids:
        return
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0)
    except Exception as exc:  # whatever the broker's client raises: a cancel never fails for it
        click.echo(
            f"the broker did not answer ({exc}): no task-revoked event is sent, so "
            "Flower and celery events may still show the job waiting",
            err=True,
        )
        return
    revoke.announce(celery_app, job_ids)


def _jobs_text(count: int) -> str:
    """``1 job``, ``3 jobs``: how the audit trail names the jobs a bulk action changed."""
    return f"{count:,} job" if count == 1 else f"{count:,} jobs"


@click.command()
@_JSON_OPTION
def stats(as_json: bool) -> None:
    """How many jobs the ledger holds in each state; by queue, how many wait
    or run, how long the job due longest ago has waited for a worker, and
    whether the queue is paused."""
    routes = Queues(_installation().celery_app)
    with _ledger_session() as session:
        figures = _figures(session, routes, utcnow())
    if as_json:
        _echo_json(figures)
        return
    _table([("state", "jobs"), *((state, f"{n:,}") for state, n in figures["by_state"].items())])
    click.echo()
    rows = [
        (
            queue,
            *(f"{found[state]:,}" for state in UNFINISHED),
            "-"
            if found["longest_wait_seconds"] is None
            else wording.duration(found["longest_wait_seconds"]),
            "paused" if found["paused"] else "-",
        )
        for queue, found in figures["by_queue"].items()
    ]
    _table([("queue", *UNFINISHED, "longest wait", "paused"), *rows])


def _figures(session: orm.Session, routes: Queues, now: datetime) -> dict[str, Any]:
    """``jobs stats``'s figures at ``now``, as its JSON document: jobs by
    state; by queue (each configured or routed one, and any other that has
    jobs), those unfinished by state, the seconds the job due longest ago
    has waited, and whether it is paused; that wait over every queue."""
    named = named_queue()
    by_state = {str(state): 0 for state in State}
    for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        by_state[str(state)] = int(count)
    by_queue: dict[str, Counter[str]] = {queue: Counter() for queue in routes.names()}
    unfinished = session.execute(
        select(Job.name, named, Job.state, func.count())
        .where(Job.state.in_(UNFINISHED))
        .group_by(Job.name, named, Job.state)
    )
    for name, queue, state, count in unfinished:
        by_queue.setdefault(routes.of(name, queue), Counter())[str(state)] += int(count)
    longest: dict[str, float] = {}
    due = session.execute(
        select(Job.name, named, func.min(Job.available_at))
        .where(Job.state.in_(CLAIMABLE), Job.available_at <= now)
        .group_by(Job.name, named)
    )
    for name, queue, since in due:
        key = routes.of(name, queue)
        longest[key] = max((now - since).total_seconds(), longest.get(key, 0.0))
    held = {pause.queue for pause in queues.paused(session)}
    for queue in held:
        by_queue.setdefault(queue, Counter())
    return {
        "at": now.isoformat(),
        "by_state": by_state,
        "by_queue": {
            queue: {
                **{str(state): states[str(state)] for state in UNFINISHED},
                "longest_wait_seconds": longest.get(queue),
                "paused": queue in held,
            }
            for queue, states in sorted(by_queue.items())
        },
        "longest_wait_seconds": max(longest.values(), default=None),
    }


@click.command()
@click.argument("queue")
def pause(queue: str) -> None:
    """Pause QUEUE: its jobs wait in the ledger until it is resumed (none is
    published, and a worker hands back any it receives, unrun)."""
    with _ledger_session() as session:
        name = _queue_name(queue)
        if not queues.pause(session, name, by=audit.CLI):
            found = queues.state(session, name)
            click.echo(f"queue {name} was paused already, by {found.paused_by}")
            return
        _record(session, audit.Action.QUEUE_PAUSE, name)
    click.echo(f"queue {name} is paused: its jobs wait until `jobs resume {name}`")


@click.command()
@click.argument("queue")
def resume(queue: str) -> None:
    """Resume the paused QUEUE: what waits in it is published, due time first."""
    with _ledger_session() as session:
        name = _queue_name(queue)
        if not queues.resume(session, name):
            click.echo(f"queue {name} was not paused")
            return
        _record(session, audit.Action.QUEUE_RESUME, name)
    click.echo(f"queue {name} is resumed")


@click.command("queues")
@_JSON_OPTION
def list_queues(as_json: bool) -> None:
    """Each queue that is paused or has jobs waiting (every tenant's): how
    many wait, and who paused it and when; with --json, {"queues": [...]} as
    the queue API shows them."""
    with _ledger_session() as session:
        found = queues.listing(session)
    if as_json:
        _echo_json({"queues": [queue.to_json() for queue in found]})
        return
    if not found:
        click.echo("no queue is paused or has jobs waiting")
        return
    rows = [
        (
            queue.name,
            f"{queue.waiting:,}",
            f"by {queue.paused_by} since {wording.moment(queue.paused_at)}"
            if queue.paused
            else "-",
        )
        for queue in found
    ]
    _table([("queue", "waiting", "paused"), *rows])


def _queue_name(queue: str) -> str:
    try:
        return queues.checked(queue)
    except queues.InvalidQueueName as exc:
        raise click.BadParameter(str(exc), param_hint="QUEUE") from None


COMMANDS = (list_jobs, show, retry_jobs, cancel_jobs, stats, pause, resume, list_queues)
"""The commands, for the ``jobs`` group."""
