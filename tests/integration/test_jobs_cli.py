"""``proj jobs list|show|retry|cancel|stats|pause|resume|queues`` on real
databases: what each
prints agrees with the ledger's rows; retry and cancel (one job, or every
job a filter matches, counted and confirmed) change exactly the rows they
say, through the console's actions, with the same audit entries by ``cli``;
a confirmation refused changes nothing; a retried job is published through
the application's installation (the relay's to publish without one, or
with the broker down), and a cancel holds with the broker down.

The commands run in click's runner under a group that hands them the
stack's ledger and installation, as ``proj`` does; one test runs the real
``proj`` command. Messages go to the in-memory queue unless a test says.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pytest
from celery import Celery
from click.testing import CliRunner, Result
from flask import Flask
from sqlalchemy import select, update
from stacks import queue_depth

from proj.db import session_scope, worker_engine
from proj.jobs import Job, Jobs, cli, ledger, outbox, queues, utcnow
from proj.jobs.audit import CLI, AuditEntry
from proj.jobs.cli_jobs import UNFINISHED
from proj.jobs.console import bulk
from proj.jobs.testing import InMemoryQueue

if TYPE_CHECKING:
    from conftest import Stack

WORKER = "celery@cli-test:4242"
PROJ = Path(sys.executable).parent / "proj"


@click.group()
@click.pass_context
def application(ctx: click.Context) -> None:
    """An application's command, as ``proj`` is: it hands the ``jobs``
    group its ledger and its installation (that of ``ctx.obj``, a Celery app)."""
    installation = Jobs.of(ctx.obj)
    ctx.meta[cli.DATABASE_URL] = installation.database_url
    ctx.meta[cli.INSTALLATION] = lambda: installation


application.add_command(cli.jobs)


def run(celery_app: Celery, *args: str, stdin: str | None = None, status: int = 0) -> Result:
    """``jobs`` with ``args`` under :func:`application`; it must end with ``status``."""
    done = CliRunner().invoke(application, ["jobs", *args], input=stdin, obj=celery_app)
    assert done.exit_code == status, done.output
    assert "Traceback" not in done.output
    return done


def tag() -> str:
    return uuid.uuid4().hex[:12]


def enqueue(celery_app: Celery, name: str, **options: Any) -> str:
    """A new queued job, through the outbox."""
    with session_scope() as session:
        return outbox.enqueue(
            session, Jobs.of(celery_app), name, [], {}, max_attempts=1, options=options
        )


def failed(celery_app: Celery, name: str) -> str:
    """A new job whose one attempt failed."""
    job_id = enqueue(celery_app, name)
    assert ledger.claim(worker_engine(), job_id, WORKER).claimed
    ledger.record_failure(worker_engine(), job_id=job_id, name=name, error="ValueError: no")
    return job_id


def rows(job_ids: Sequence[str]) -> dict[str, Job]:
    with session_scope() as session:
        found = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        session.expunge_all()
        return found


def states(job_ids: Sequence[str]) -> dict[str, str]:
    return {job_id: job.state for job_id, job in rows(job_ids).items()}


def entries(target: str) -> list[AuditEntry]:
    """The audit entries naming ``target`` (a job's id), oldest first."""
    with session_scope() as session:
        query = select(AuditEntry).where(AuditEntry.target == target).order_by(AuditEntry.id)
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def bulk_entries(job_id: str) -> list[AuditEntry]:
    """The bulk actions' entries whose changed jobs include ``job_id``."""
    with session_scope() as session:
        query = select(AuditEntry).where(AuditEntry.action.like("jobs.bulk_%"))
        found = [e for e in session.scalars(query) if job_id in (e.detail or {}).get("job_ids", ())]
        session.expunge_all()
        return found


def created_at(moments: dict[str, datetime]) -> None:
    with session_scope() as session:
        for job_id, moment in moments.items():
            session.execute(update(Job).where(Job.id == job_id).values(created_at=moment))


def listed(output: str) -> list[str]:
    """The job ids of the table ``list`` printed, in order."""
    lines = output.splitlines()
    assert lines[0].split() == ["id", "name", "state", "attempts", "created", "tenant"]
    return [line.split()[0] for line in lines[1:]]


def test_list_shows_the_jobs_the_filters_match_newest_first(
    celery_app: Celery, memory: InMemoryQueue
) -> None:
    name = f"tests.cli.{tag()}"
    waiting = [enqueue(celery_app, name) for _ in range(3)]
    long = enqueue(celery_app, name, queue="long")
    broken = failed(celery_app, name)
    made = [*waiting, long, broken]
    created_at({job_id: datetime(2003, 1, 1, n, tzinfo=UTC) for n, job_id in enumerate(made)})
    newest_first = made[::-1]

    assert listed(run(celery_app, "list", "--name", name).output) == newest_first
    assert listed(run(celery_app, "list", "--name", name, "--limit", "2").output) == [broken, long]
    assert listed(run(celery_app, "list", "--name", name, "--state", "failed").output) == [broken]
    assert listed(run(celery_app, "list", "--name", name, "--queue", "long").output) == [long]
    until = ["--since", "2003-01-01T01:00", "--until", "2003-01-01T03:00"]
    assert listed(run(celery_app, "list", "--name", name, *until).output) == made[2:0:-1]
    (row,) = run(celery_app, "list", "--q", broken).output.splitlines()[1:]
    assert row.split() == [broken, name, "failed", "1/1", "2003-01-01", "04:00:00", "UTC", "-"]
    assert run(celery_app, "list", "--name", f"{name}.none").output == "no job matches\n"

    document = json.loads(run(celery_app, "list", "--name", name, "--json").output)
    assert [job["id"] for job in document["jobs"]] == newest_first
    assert (document["jobs"][0]["state"], document["jobs"][0]["error"]) == (
        "failed",
        "ValueError: no",
    )


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--since", "yesterday"], "'--since'"),
        (["--since", "2025-02-01T00:00", "--until", "2025-01-01T00:00"], "'--until'"),
        (["--state", "lost"], "'--state'"),
        (["--name", "x" * 256], "'--name'"),
    ],
    ids=["time", "order", "state", "length"],
)
def test_a_filter_that_cannot_be_used_is_an_error_naming_its_option(
    celery_app: Celery, args: list[str], option: str
) -> None:
    for command in ("list", "retry", "cancel"):
        done = run(celery_app, command, *args, status=2)
        assert f"Invalid value for {option}" in done.output


def test_retry_and_cancel_take_an_id_or_a_filter_not_both_nor_neither(celery_app: Celery) -> None:
    for command in ("retry", "cancel"):
        assert "not both" in run(celery_app, command, "x", "--state", "failed", status=2).output
        assert "give a job's ID" in run(celery_app, command, status=2).output


def test_show_prints_the_job_and_each_attempts_error(
    celery_app: Celery, memory: InMemoryQueue
) -> None:
    name = f"tests.cli.{tag()}"
    with session_scope() as session:
        job_id = outbox.enqueue(
            session, Jobs.of(celery_app), name, [], {}, max_attempts=2, options={}
        )
    assert ledger.claim(worker_engine(), job_id, WORKER).claimed
    assert ledger.retrying(worker_engine(), job_id, 1, "KeyError: 'first'", "tb 1", utcnow())
    assert ledger.claim(worker_engine(), job_id, WORKER).claimed
    ledger.record_failure(
        worker_engine(), job_id=job_id, name=name, error="ValueError: second", traceback="tb 2"
    )

    text = run(celery_app, "show", job_id).output
    fields = dict(line.split(maxsplit=1) for line in text.split("\n\n")[0].splitlines())
    assert {k: fields[k] for k in ("id", "name", "state", "attempts", "error")} == {
        "id": job_id,
        "name": name,
        "state": "failed",
        "attempts": "2",
        "error": "ValueError: second",
    }
    errors = text.split("attempts that ended in an error:\n")[1].splitlines()
    assert [line.split()[:2] for line in errors] == [["1", "retrying"], ["2", "failed"]]
    assert "KeyError: 'first'" in errors[0] and WORKER in errors[0]
    assert "ValueError: second" in errors[1]

    document = json.loads(run(celery_app, "show", job_id, "--json").output)
    assert (document["id"], document["state"]) == (job_id, "failed")
    assert [(e["error"], e["traceback"]) for e in document["errors"]] == [
        ("KeyError: 'first'", "tb 1"),
        ("ValueError: second", "tb 2"),
    ]
    unknown = run(celery_app, "show", str(uuid.uuid4()), status=1)
    assert "no job with id" in unknown.output


def test_retry_of_a_job_queues_it_publishes_it_and_records_it(
    celery_app: Celery, memory: InMemoryQueue
) -> None:
    """A retry of a job no longer failed is an error, and records nothing."""
    job_id = failed(celery_app, f"tests.cli.{tag()}")
    memory.clear()

    done = run(celery_app, "retry", job_id)

    assert "is queued again" in done.output
    (job,) = rows([job_id]).values()
    assert (job.state, job.max_attempts) == ("queued", 2)
    assert job.published_at is not None
    assert [m.id for m in memory.jobs] == [job_id]
    again = run(celery_app, "retry", job_id, status=1)
    assert "only a failed job is retried" in again.output
    (entry,) = entries(job_id)
    assert (entry.action, entry.target, entry.address, entry.tenant) == (
        "job.retry",
        job_id,
        None,
        None,
    )
    assert entry.detail is not None and "os_user" in entry.detail


def test_cancel_of_a_job_cancels_a_waiting_one_and_asks_a_running_one_to_stop(
    celery_app: Celery, memory: InMemoryQueue
) -> None:
    name = f"tests.cli.{tag()}"
    waiting, running = enqueue(celery_app, name), enqueue(celery_app, name)
    assert ledger.claim(worker_engine(), running, WORKER).claimed

    assert "will never run" in run(celery_app, "cancel", waiting).output
    assert "asked to stop" in run(celery_app, "cancel", running).output
    finished = run(celery_app, "cancel", waiting, status=1)

    assert "only a waiting or running job is cancelled" in finished.output
    found = rows([waiting, running])
    assert found[waiting].state == "cancelled"
    assert found[running].state == "running" and found[running].cancel_requested_at is not None
    assert [(e.action, (e.detail or {})["was"]) for e in entries(waiting)] == [
        ("job.cancel", "queued")
    ]
    assert [(e.action, (e.detail or {})["was"]) for e in entries(running)] == [
        ("job.cancel", "running")
    ]


def test_a_bulk_retry_counts_asks_and_changes_nothing_when_refused(
    celery_app: Celery, memory: InMemoryQueue
) -> None:
    """Three failed jobs and a queued one of a task: the count is three; no
    changes no row; yes retries the three, publishes them, and records one
    entry with the filter and the counts."""
    name = f"tests.cli.{tag()}"
    broken = [failed(celery_app, name) for _ in range(3)]
    waiting = enqueue(celery_app, name)
    memory.clear()

    refused = run(celery_app, "retry", "--name", name, stdin="n\n", status=1)

    assert "3 failed jobs match" in refused.output and "Retry them?" in refused.output
    assert set(states([*broken, waiting]).values()) == {"failed", "queued"}
    assert states(broken) == dict.fromkeys(broken, "failed")
    assert bulk_entries(broken[0]) == [] and memory.jobs == []

    done = run(celery_app, "retry", "--name", name, stdin="y\n")

    assert "retried 3 jobs" in done.output
    assert states([*broken, waiting]) == {**dict.fromkeys(broken, "queued"), waiting: "queued"}
    assert sorted(m.id for m in memory.jobs) == sorted(broken)
    (entry,) = bulk_entries(broken[0])
    assert (entry.actor, entry.action, entry.target) == (CLI, "jobs.bulk_retry", "3 jobs")
    assert entry.detail is not None
    assert entry.detail["filter"] == {"name": name}
    assert (entry.detail["picked"], entry.detail["done"], entry.detail["capped"]) == (3, 3, False)
    assert sorted(entry.detail["job_ids"]) == sorted(broken)
    assert "os_user" in entry.detail


def test_a_bulk_cancel_with_yes_asks_nothing_and_leaves_other_jobs(
    celery_app: Celery, memory: InMemoryQueue
) -> None:
    name = f"tests.cli.{tag()}"
    waiting = [enqueue(celery_app, name) for _ in range(2)]
    running = enqueue(celery_app, name)
    assert ledger.claim(worker_engine(), running, WORKER).claimed
    broken = failed(celery_app, name)
    other = enqueue(celery_app, f"{name}.other")

    done = run(celery_app, "cancel", "--name", name, "--yes")

    assert "3 waiting or running jobs match" in done.output and "?" not in done.output
    assert "cancelled 2 jobs" in done.output and "asked 1 job running to stop" in done.output
    after = rows([*waiting, running, broken, other])
    assert [after[job_id].state for job_id in waiting] == ["cancelled", "cancelled"]
    assert after[running].state == "running" and after[running].cancel_requested_at is not None
    assert (after[broken].state, after[other].state) == ("failed", "queued")
    (entry,) = bulk_entries(running)
    assert (entry.action, entry.target) == ("jobs.bulk_cancel", "3 jobs")
    assert entry.detail is not None and (entry.detail["done"], entry.detail["stopping"]) == (2, 1)
    again = run(celery_app, "cancel", "--name", name, "--state", "queued", "--yes")
    assert again.output == "no waiting or running job matches; nothing to cancel\n"


def test_a_bulk_action_takes_at_most_a_batch_the_newest_first(
    celery_app: Celery, memory: InMemoryQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "BATCH_LIMIT", 2)
    name = f"tests.cli.{tag()}"
    made = [failed(celery_app, name) for _ in range(3)]
    created_at({job_id: datetime(2003, 1, 1, n, tzinfo=UTC) for n, job_id in enumerate(made)})

    done = run(celery_app, "retry", "--name", name, "--yes")

    assert "2+ failed jobs match" in done.output and "only the newest 2" in done.output
    assert "retried 2 jobs" in done.output
    assert states(made) == {made[0]: "failed", made[1]: "queued", made[2]: "queued"}


@pytest.fixture
def paused() -> Iterator[str]:
    """A queue of no job, paused for the test."""
    name = f"tests-cli-{tag()}"
    with session_scope() as session:
        queues.pause(session, name, by=CLI)
    yield name
    with session_scope() as session:
        queues.resume(session, name)


def test_stats_counts_jobs_by_state_and_queue_and_the_longest_wait(
    celery_app: Celery, memory: InMemoryQueue, paused: str
) -> None:
    """Against the figures before: two queued jobs of the long queue (one
    due an hour ago) and a failed one are counted where they belong; a
    paused queue says so."""
    before = json.loads(run(celery_app, "stats", "--json").output)
    name = f"tests.cli.{tag()}"
    long = [enqueue(celery_app, name, queue="long") for _ in range(2)]
    failed(celery_app, name)
    with session_scope() as session:
        hour_ago = utcnow() - timedelta(hours=1)
        session.execute(update(Job).where(Job.id == long[0]).values(available_at=hour_ago))

    after = json.loads(run(celery_app, "stats", "--json").output)

    assert after["by_state"]["queued"] - before["by_state"]["queued"] == 2
    assert after["by_state"]["failed"] - before["by_state"]["failed"] == 1
    assert after["by_queue"]["long"]["queued"] - before["by_queue"]["long"]["queued"] == 2
    assert set(after["by_queue"]) >= {"celery", "long"}
    assert after["by_queue"]["long"]["longest_wait_seconds"] >= 3600
    assert after["longest_wait_seconds"] >= 3600
    assert (after["by_queue"]["long"]["paused"], after["by_queue"][paused]["paused"]) == (
        False,
        True,
    )
    text = run(celery_app, "stats").output
    by_state, by_queue = (
        [line.split() for line in part.splitlines()] for part in text.split("\n\n")
    )
    assert by_state[0] == ["state", "jobs"]
    assert ["failed", f"{after['by_state']['failed']:,}"] in by_state
    assert by_queue[0] == ["queue", *UNFINISHED, "longest", "wait", "paused"]
    (long_row,) = (row for row in by_queue if row[0] == "long")
    assert {"h", "d"} & set(long_row) and long_row[-1] == "-"
    assert [paused, "0", "0", "0", "0", "-", "paused"] in by_queue


def test_without_an_application_a_retry_is_left_to_the_relay(
    celery_app: Celery, memory: InMemoryQueue
) -> None:
    """``jobs`` on its own (DATABASE_URL alone) knows no application's
    routes: the job is queued again and owed, for the relay to publish."""
    job_id = failed(celery_app, f"tests.cli.{tag()}")
    memory.clear()
    env = {"DATABASE_URL": Jobs.of(celery_app).database_url}

    done = CliRunner().invoke(cli.jobs, ["retry", job_id], env=env)

    assert done.exit_code == 0, done.output
    (job,) = rows([job_id]).values()
    assert (job.state, job.published_at, memory.jobs) == ("queued", None, [])
    assert [e.action for e in entries(job_id)] == ["job.retry"]


def test_under_flask_the_apps_installation_publishes(
    app: Flask, celery_app: Celery, memory: InMemoryQueue
) -> None:
    """``flask jobs retry`` (the group added to ``flask_app.cli``) runs in the
    app's context: the retry goes through the app's installation."""
    job_id = failed(celery_app, f"tests.cli.{tag()}")
    memory.clear()
    env = {"DATABASE_URL": Jobs.of(celery_app).database_url}

    with app.app_context():
        done = CliRunner().invoke(cli.jobs, ["retry", job_id], env=env)

    assert done.exit_code == 0, done.output
    assert [m.id for m in memory.jobs] == [job_id]


@pytest.fixture
def down(celery_app: Celery) -> Iterator[Celery]:
    """A Celery app on the stack's ledger whose broker does not answer."""
    made = Celery("down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    installation = Jobs(made, database_url=Jobs.of(celery_app).database_url)
    yield made
    installation.dispose()


def test_with_the_broker_down_retry_and_cancel_still_hold(celery_app: Celery, down: Celery) -> None:
    """The retried job is owed (the relay publishes it later); the cancel
    holds, and says it could not be announced."""
    name = f"tests.cli.{tag()}"
    broken = failed(celery_app, name)
    with Jobs.of(down).session_scope() as session:
        waiting = outbox.enqueue(session, Jobs.of(down), name, [], {}, max_attempts=1, options={})

    retried = CliRunner().invoke(application, ["jobs", "retry", broken], obj=down)
    cancelled = CliRunner().invoke(application, ["jobs", "cancel", waiting], obj=down)

    assert (retried.exit_code, cancelled.exit_code) == (0, 0), retried.output + cancelled.output
    assert "the broker did not answer" in cancelled.stderr
    found = rows([broken, waiting])
    assert (found[broken].state, found[broken].published_at) == ("queued", None)
    assert found[waiting].state == "cancelled"


@pytest.fixture
def emptied(purged: Celery) -> Iterator[Celery]:
    """The stack's queues empty before the test and after it."""
    yield purged
    purged.control.purge()


def test_the_proj_command_publishes_a_retry_through_proj_s_app(
    stack: Stack, emptied: Celery
) -> None:
    """The real ``proj jobs retry``: the message is in the broker's queue, and
    the row says so."""
    job_id = str(uuid.uuid4())
    ledger.record_failure(worker_engine(), job_id=job_id, name="proj.tasks.pool_status", error="no")

    done = subprocess.run(
        [str(PROJ), "jobs", "retry", job_id],
        env=stack.process_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert "is queued again" in done.stdout
    (job,) = rows([job_id]).values()
    assert job.state == "queued" and job.published_at is not None
    assert queue_depth(emptied) == 1


def test_pause_and_resume_hold_a_queue_and_say_so(celery_app: Celery) -> None:
    """``pause`` holds a queue (a second pause says who holds it), ``queues``
    lists it with its waiting job, ``resume`` lets it go (a second resume
    says it was not paused); each change is one audit entry by ``cli``."""
    name = f"tests-cli-{tag()}"
    enqueue(celery_app, "tests.cli.paused", queue=name)
    assert f"queue {name} is paused" in run(celery_app, "pause", name).output
    assert "paused already, by cli" in run(celery_app, "pause", name).output
    listed = json.loads(run(celery_app, "queues", "--json").output)["queues"]
    (mine,) = (queue for queue in listed if queue["name"] == name)
    assert (mine["paused"], mine["paused_by"], mine["waiting"]) == (True, CLI, 1)
    row = next(line for line in run(celery_app, "queues").output.splitlines() if name in line)
    assert row.split()[:4] == [name, "1", "by", "cli"]
    assert f"queue {name} is resumed" in run(celery_app, "resume", name).output
    assert "was not paused" in run(celery_app, "resume", name).output
    with session_scope() as session:
        assert queues.state(session, name).paused is False
    assert [(e.action, e.actor) for e in entries(name)] == [
        ("queue.pause", CLI),
        ("queue.resume", CLI),
    ]
    refused = run(celery_app, "pause", "a\x00b", status=2)
    assert "cannot hold a NUL" in refused.output
