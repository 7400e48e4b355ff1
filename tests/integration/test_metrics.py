"""GET /metrics with a real worker in this process (no
``PROMETHEUS_MULTIPROC_DIR``: the process counts for itself): after a known
mix of jobs, the counters and histograms moved by exactly that mix; the
ledger's gauges are what the ledger's rows say (counted here, row by row);
no label is a pid or an id; a scrape needs a token."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

import proj.jobs.testing
from proj.db import db as web_db
from proj.jobs import JobCancelled, Jobs, auth, ledger, metrics_api, retry_on, shared_task, utcnow
from proj.jobs.console.filters import Queues
from proj.jobs.models import CLAIMABLE, FINISHED, Job, State

Sample = tuple[str, frozenset[tuple[str, str]]]
COUNTED = (
    "proj_jobs_enqueued_total",
    "proj_jobs_finished_total",
    "proj_jobs_retries_total",
    "proj_job_run_duration_seconds_count",
    "proj_job_enqueue_to_start_seconds_count",
)
PAUSE = 0.05
COUNTDOWN = 1.5
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Flaky(Exception):
    """What ``tests.metrics.flaky`` raises, and retries once."""


@shared_task(name="tests.metrics.ok", ignore_result=False)
def ok(pause: float = 0.0) -> str:
    time.sleep(pause)
    return "ok"


@shared_task(name="tests.metrics.later")
def later() -> str:
    return "later"


@shared_task(name="tests.metrics.boom")
def boom() -> None:
    raise ValueError("boom")


@shared_task(name="tests.metrics.flaky")
@retry_on(Flaky, max_retries=1, backoff=0.01, jitter=False)
def flaky() -> None:
    raise Flaky("again")


@shared_task(name="tests.metrics.stops")
def stops() -> None:
    raise JobCancelled()


TASKS = {f"tests.metrics.{name}" for name in ("ok", "later", "boom", "flaky", "stops")}


def scrape_text(client: FlaskClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return response.get_data(as_text=True)


def samples(text: str) -> dict[Sample, float]:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def ours(found: Mapping[Sample, float]) -> dict[Sample, float]:
    """The counted samples of this module's tasks."""
    return {
        key: value
        for key, value in found.items()
        if key[0] in COUNTED and dict(key[1]).get("task") in TASKS
    }


def deltas(before: Mapping[Sample, float], after: Mapping[Sample, float]) -> dict[Sample, float]:
    moved = {key: value - before.get(key, 0.0) for key, value in ours(after).items()}
    return {key: value for key, value in moved.items() if value}


def mismatches(
    moved: Mapping[Sample, float], expected: Mapping[Sample, float]
) -> dict[Sample, tuple[float, float]]:
    """The samples that did not move as expected: (moved by, expected)."""
    return {
        key: (moved.get(key, 0.0), expected.get(key, 0.0))
        for key in moved.keys() | expected.keys()
        if moved.get(key, 0.0) != expected.get(key, 0.0)
    }


def sample(name: str, **labels: str) -> Sample:
    return (name, frozenset(labels.items()))


def expected_deltas() -> dict[Sample, float]:
    """The mix :func:`test_counters_and_histograms_move_by_the_mix_run` runs."""
    runs = {"ok": 6, "later": 1, "boom": 2, "flaky": 2, "stops": 1}
    enqueued = {"ok": 6, "later": 1, "boom": 2, "flaky": 1, "stops": 1}
    finished = {
        ("ok", "succeeded"): 6,
        ("later", "succeeded"): 1,
        ("boom", "failed"): 2,
        ("flaky", "failed"): 1,
        ("stops", "cancelled"): 1,
    }
    found: dict[Sample, float] = {}
    for short, count in enqueued.items():
        found[sample("proj_jobs_enqueued_total", task=f"tests.metrics.{short}")] = count
    for (short, state), count in finished.items():
        task = f"tests.metrics.{short}"
        found[sample("proj_jobs_finished_total", task=task, state=state)] = count
    found[sample("proj_jobs_retries_total", task="tests.metrics.flaky")] = 1
    for short, count in runs.items():
        task = f"tests.metrics.{short}"
        found[sample("proj_job_run_duration_seconds_count", task=task)] = count
        found[sample("proj_job_enqueue_to_start_seconds_count", task=task)] = count
    return found


def test_counters_and_histograms_move_by_the_mix_run(
    app: Flask, client: FlaskClient, purged: Celery
) -> None:
    """Ledger jobs that succeed, fail, retry then fail, and stop as asked;
    plain ``.delay()`` runs; a job with an ETA; and enqueues that never count
    (a rolled-back transaction, a rolled-back savepoint, a unique key held).
    Each counter moves by exactly its share, runs are timed (pauses
    included), and the wait to start leaves the ETA out."""
    jobs = Jobs.of(purged)
    before = samples(scrape_text(client))
    with proj.jobs.testing.worker(purged):
        with jobs.session_scope() as session:
            ledger_jobs = [
                ok.apply_async_on_commit((PAUSE,), session=session),
                ok.apply_async_on_commit((PAUSE,), session=session),
                ok.apply_async_on_commit(session=session, unique="metrics-once"),
                boom.apply_async_on_commit(session=session),
                boom.apply_async_on_commit(session=session),
                flaky.apply_async_on_commit(session=session),
                stops.apply_async_on_commit(session=session),
            ]
            delayed = later.apply_async_on_commit(session=session, countdown=COUNTDOWN)
            ledger_jobs.append(delayed)
            held = ok.apply_async_on_commit(session=session, unique="metrics-once")
        assert held == ledger_jobs[2]
        with pytest.raises(RuntimeError), jobs.session_scope() as session:
            ok.apply_async_on_commit(session=session)
            raise RuntimeError("rolled back")
        with jobs.session_scope() as session:
            ledger_jobs.append(ok.apply_async_on_commit(session=session))
            with pytest.raises(RuntimeError), session.begin_nested():
                ok.apply_async_on_commit(session=session)
                raise RuntimeError("savepoint rolled back")
        plain = [ok.delay(), ok.delay()]

        for result in plain:
            assert result.get(timeout=60) == "ok"
        ended = Counter(
            proj.jobs.testing.wait_for_state(job_id, *FINISHED, timeout=60).state
            for job_id in ledger_jobs
        )
        assert ended == {State.SUCCEEDED: 5, State.FAILED: 3, State.CANCELLED: 1}
        expected = expected_deltas()

        def settled() -> dict[Sample, float] | None:
            found = samples(scrape_text(client))
            return found if not mismatches(deltas(before, found), expected) else None

        try:
            after = proj.jobs.testing.wait_for(settled, timeout=30)
        except AssertionError:
            moved = deltas(before, samples(scrape_text(client)))
            raise AssertionError(f"(moved, expected): {mismatches(moved, expected)}") from None
    # Nothing more counts once the runs are over (no late double count).
    assert deltas(before, samples(scrape_text(client))) == expected

    paused = sample("proj_job_run_duration_seconds_sum", task="tests.metrics.ok")
    assert after[paused] - before.get(paused, 0.0) >= 2 * PAUSE
    started = proj.jobs.testing.job(delayed)
    assert started.started_at is not None
    assert (started.started_at - started.created_at).total_seconds() >= COUNTDOWN - 0.1
    waited = sample("proj_job_enqueue_to_start_seconds_sum", task="tests.metrics.later")
    assert after[waited] - before.get(waited, 0.0) < 1.0, (
        "the delay to its ETA was counted as waiting"
    )
    longest = sample("proj_job_run_duration_seconds_bucket", task="tests.metrics.ok", le="+Inf")
    assert after[longest] - before.get(longest, 0.0) == 6

    job_ids = set(ledger_jobs) | {result.id for result in plain}
    label_values = {value for _, labels in after for _, value in labels}
    assert not label_values & job_ids
    assert not [value for value in label_values if UUID.search(value)]
    assert not [labels for _, labels in after if "pid" in dict(labels)]


def ledger_counts(celery_app: Celery) -> dict[str, Any]:
    """The ledger's unfinished jobs by state and by queue, owed jobs due now
    and when the earliest fell due, counted here row by row."""
    queues = Queues(celery_app)
    now = utcnow()
    with Jobs.of(celery_app).session_scope() as session:
        rows = session.execute(
            select(Job.name, Job.options, Job.state, Job.published_at, Job.available_at)
        ).all()
    unfinished = [row for row in rows if row.state in (State.QUEUED, State.RUNNING, State.RETRYING)]
    waiting = Counter(
        (row.options or {}).get("queue") or queues.routed(row.name)
        for row in unfinished
        if row.state in CLAIMABLE
    )
    owed = [
        row
        for row in unfinished
        if row.state in CLAIMABLE and row.published_at is None and row.available_at <= now
    ]
    return {
        "by_state": {
            state: sum(1 for row in unfinished if row.state == state)
            for state in ("queued", "running", "retrying")
        },
        "waiting": waiting,
        "owed": len(owed),
        "oldest": min((row.available_at for row in owed), default=None),
    }


def gauge(found: Mapping[Sample, float], name: str) -> dict[str, float]:
    """A gauge's values by its one label's value ("" for none)."""
    return {
        next(iter(dict(labels).values()), ""): value
        for (sample_name, labels), value in found.items()
        if sample_name == name
    }


def test_ledger_gauges_are_the_ledgers_counts(
    app: Flask, client: FlaskClient, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs left owed to the broker (the fast path off, no worker to relay
    them), in the default queue and in ``long``: every ledger gauge equals
    the count made here from the rows. A job due in an hour is waiting, and
    owed nothing yet: in neither owed gauge."""
    jobs = Jobs.of(celery_app)
    monkeypatch.setattr(jobs, "settings", replace(jobs.settings, outbox_fast_path=False))
    with jobs.session_scope() as session:
        owed = [ok.apply_async_on_commit(session=session) for _ in range(2)]
        owed.append(ok.apply_async_on_commit(session=session, queue="long"))
        later = ok.apply_async_on_commit(session=session, countdown=3600)
    try:
        time.sleep(0.2)  # the oldest owed job's age is more than nothing
        scraped_at = utcnow()
        found = samples(scrape_text(client))
        counted = ledger_counts(celery_app)
    finally:
        with jobs.session_scope() as session:
            for job_id in [*owed, later]:
                ledger.cancel(session, job_id)

    assert gauge(found, "proj_ledger_up") == {"": 1}
    assert gauge(found, "proj_jobs") == counted["by_state"]
    assert counted["by_state"]["queued"] >= 4
    waiting = gauge(found, "proj_jobs_waiting")
    assert {queue: value for queue, value in waiting.items() if value} == counted["waiting"]
    assert {"celery", "long"} <= set(waiting), "a known queue shows, if only at 0"
    assert waiting["long"] >= 1
    assert waiting["celery"] >= 2
    assert gauge(found, "proj_outbox_owed") == {"": counted["owed"]}
    assert counted["owed"] >= 3
    age = gauge(found, "proj_outbox_oldest_owed_age_seconds")[""]
    assert 0.2 <= age <= (scraped_at - counted["oldest"]).total_seconds() + 5
    assert not [labels for _, labels in found if "pid" in dict(labels)]
    assert not set(owed) & {value for _, labels in found for _, value in labels}


def test_an_unreadable_ledger_says_so_and_the_counters_still_answer(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(*_: Any) -> None:
        raise OperationalError("SELECT", {}, Exception("the database went away"))

    monkeypatch.setattr(metrics_api, "ledger_figures", unreadable)
    text = scrape_text(client)
    found = samples(text)
    assert gauge(found, "proj_ledger_up") == {"": 0}
    assert gauge(found, "proj_outbox_owed") == {}
    assert "# TYPE proj_jobs_enqueued_total counter" in text


def test_a_scrape_needs_a_token_of_no_tenant(app: Flask, make_token: Any) -> None:
    """No token, or an unknown one: 401 and no metrics. A viewer's: 200. A
    tenant's: 403 (the metrics count every tenant's jobs)."""
    anonymous = app.test_client()
    for headers in ({}, {"Authorization": f"Bearer proj_{uuid.uuid4().hex}"}):
        response = anonymous.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert "proj_jobs" not in response.get_data(as_text=True)
    viewer = make_token(app, "viewer")
    response = anonymous.get("/metrics", headers={"Authorization": f"Bearer {viewer}"})
    assert response.status_code == 200
    assert "proj_ledger_up 1.0" in response.get_data(as_text=True)

    tenants = make_token(app, "operator")
    with app.app_context():
        row = auth.token_for(web_db.session, tenants)
        assert row is not None
        row.tenant = "acme"
        web_db.session.commit()
    response = anonymous.get("/metrics", headers={"Authorization": f"Bearer {tenants}"})
    assert response.status_code == 403
    assert "proj_jobs" not in response.get_data(as_text=True)
