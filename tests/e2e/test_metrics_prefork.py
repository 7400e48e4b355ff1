"""Metrics in multiprocess mode, on the real commands: a prefork worker (two
children), ``flask run`` answering ``/metrics``, and the processes that
enqueue, all with ``PROMETHEUS_MULTIPROC_DIR`` set to one new folder. After
a known mix, one scrape reports exactly that mix, whichever process counted
each part."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import e2e_tasks
import pytest
from celery import Celery
from e2e_tasks import create_effects_table, effects
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from subprocesses import E2E_DIR, Commands, api_token, e2e_env, enqueue_effects

from proj.db import session_scope, worker_engine
from proj.jobs.testing import wait_for

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

COUNTED = re.compile(
    r"proj_jobs_(enqueued|finished|retries)_total"
    r"|proj_job_(run_duration|enqueue_to_start)_seconds_count"
)
KINDS = {"succeed": 3, "fail": 2, "retry": 2}
"""``e2e.outcome`` jobs by how they end (``retry``: once, then failed)."""
SLOW = 2
"""``e2e.record_effect`` jobs that take a second each, so both children run one."""
SIGNUPS = 2
"""Sign-ups through the web process, each enqueuing a welcome job there."""

ENQUEUE_OUTCOMES = """
import json, sys
import e2e_tasks
from proj.db import session_scope
with session_scope() as session:
    ids = [
        e2e_tasks.outcome.apply_async_on_commit((kind, email), session=session)
        for kind, email in json.loads(sys.argv[1])
    ]
print("\\n".join(ids))
"""


def enqueue_outcomes(env: dict[str, str], run: str) -> list[str]:
    """In a process of its own: the ``e2e.outcome`` jobs of :data:`KINDS`."""
    jobs = [
        (kind, f"{kind}-{n}-{run}@e2e.test") for kind, count in KINDS.items() for n in range(count)
    ]
    done = subprocess.run(
        [sys.executable, "-c", ENQUEUE_OUTCOMES, json.dumps(jobs)],
        env=e2e_env(env),
        cwd=E2E_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()


def http(method: str, url: str, token: str, body: dict[str, str] | None = None) -> tuple[int, str]:
    """A real HTTP request with API token ``token``: its status and text."""
    sent = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method=method,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(sent, timeout=30) as response:
        return response.status, response.read().decode()


def counted(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The counted samples of a scrape that are not 0."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if COUNTED.fullmatch(sample.name) and sample.value
    }


def expected() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What the mix counts, from a folder that was empty."""
    outcome, slow, welcome = "e2e.outcome", "e2e.record_effect", "proj.tasks.send_welcome"
    retried = KINDS["retry"]
    runs = {outcome: sum(KINDS.values()) + retried, slow: SLOW, welcome: SIGNUPS}
    found = {
        ("proj_jobs_enqueued_total", frozenset({("task", outcome)})): sum(KINDS.values()),
        ("proj_jobs_enqueued_total", frozenset({("task", slow)})): SLOW,
        ("proj_jobs_enqueued_total", frozenset({("task", welcome)})): SIGNUPS,
        ("proj_jobs_retries_total", frozenset({("task", outcome)})): retried,
    }
    finished = {
        (outcome, "succeeded"): KINDS["succeed"],
        (outcome, "failed"): KINDS["fail"] + retried,
        (slow, "succeeded"): SLOW,
        (welcome, "succeeded"): SIGNUPS,
    }
    for (task, state), count in finished.items():
        labels = frozenset({("task", task), ("state", state)})
        found["proj_jobs_finished_total", labels] = count
    for task, count in runs.items():
        for name in ("proj_job_run_duration_seconds", "proj_job_enqueue_to_start_seconds"):
            found[f"{name}_count", frozenset({("task", task)})] = count
    return found


def test_one_scrape_counts_every_process(
    stack: Stack, celery_app: Celery, commands: Commands, tmp_path: Path
) -> None:
    """Outcome jobs (succeeded, retried then failed, failed) enqueued by one
    process, two slow jobs that each child runs one of, and sign-ups whose
    welcome jobs the web process enqueues: ``/metrics`` (a viewer's token)
    reports exactly those counts, with no pid label, and the folder holds a
    file of each process that counted, named by host and pid."""
    celery_app.control.purge()
    create_effects_table(worker_engine())
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = stack.process_env(PROMETHEUS_MULTIPROC_DIR=str(folder))
    worker = commands.worker(env)
    web, url = commands.web(env)
    operator, viewer = api_token(env), api_token(env, "viewer")
    run = uuid.uuid4().hex[:10]

    outcome_ids = enqueue_outcomes(env, run)
    slow_ids = enqueue_effects(env, run, SLOW, 1.0)
    for n in range(SIGNUPS):
        status, _ = http("POST", f"{url}/api/users", operator, {"email": f"m{n}-{run}@e2e.test"})
        assert status == 201

    worker.until(
        lambda: (
            e2e_tasks.states(outcome_ids + slow_ids)
            == {"succeeded": KINDS["succeed"] + SLOW, "failed": KINDS["fail"] + KINDS["retry"]}
        ),
        timeout=60,
    )
    want = expected()

    def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return counted(http("GET", f"{url}/metrics", viewer)[1])

    try:
        wait_for(lambda: scraped() == want, timeout=30)
    except AssertionError:
        found = scraped()
        wrong = {key: (found.get(key), want.get(key)) for key in found.keys() | want.keys()}
        wrong = {key: pair for key, pair in wrong.items() if pair[0] != pair[1]}
        raise AssertionError(f"(scraped, expected): {wrong}") from None

    _, text = http("GET", f"{url}/metrics", viewer)
    assert "proj_ledger_up 1.0" in text
    assert "pid" not in {
        label
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for label in s.labels
    }
    with session_scope() as session:
        slow_pids = set(session.scalars(select(effects.c.pid).where(effects.c.tag == run)))
    assert len(slow_pids) == SLOW, "both children ran a slow job"
    host = socket.gethostname().replace("_", "-")
    named = {path.name for path in folder.glob("*.db")}
    for pid in {*slow_pids, web.pid}:
        assert f"counter_{host}-{pid}.db" in named, (pid, sorted(named))
