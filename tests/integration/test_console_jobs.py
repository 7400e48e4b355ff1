"""The console's jobs list and job pages on real databases: filters and keyset
pages agree with the ledger's rows, a job's page shows its arguments and
every attempt's error, retry and cancel (one job or many) change exactly the
rows they say, and neither a viewer nor a form without its CSRF token
changes any.

Jobs are made with the real outbox; their messages go to the in-memory
queue (nothing reaches the broker). States move through the ledger's own
functions; creation times are set in SQL where a test needs them spread.
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from consoles import csrf_of, signed_in
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, event, select, update

import proj.jobs.testing
from proj.db import session_scope, worker_engine
from proj.jobs import Job, Jobs, ledger, outbox
from proj.jobs.clock import utcnow
from proj.jobs.console import bulk
from proj.jobs.deadletter import UNRUNNABLE
from proj.jobs.models import JobAttempt
from proj.jobs.testing import InMemoryQueue
from proj.models import User

WORKER = "celery@console-test:4242"
LISTED = re.compile(r'<tr data-job-id="([^"]*)"')
OLDER = re.compile(r'<a href="([^"]+)" rel="next">')
SEARCHED_MORE = "Search older jobs"


@pytest.fixture
def operator(app: Flask, memory: InMemoryQueue) -> FlaskClient:
    return signed_in(app, "operator")


@pytest.fixture
def viewer(app: Flask, memory: InMemoryQueue) -> FlaskClient:
    return signed_in(app, "viewer")


def token(browser: FlaskClient) -> str:
    """A valid CSRF token of ``browser``'s session, from a page it may see."""
    return csrf_of(browser.get("/dashboard/jobs").text)


def tag() -> str:
    return uuid.uuid4().hex[:12]


def enqueue(
    celery_app: Celery,
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    max_attempts: int = 1,
) -> str:
    """A new queued job, enqueued through the outbox."""
    with session_scope() as session:
        return outbox.enqueue(
            session,
            Jobs.of(celery_app),
            name,
            list(args),
            dict(kwargs or {}),
            max_attempts=max_attempts,
            options=dict(options or {}),
        )


def fail(job_id: str, name: str, error: str = "ValueError: no", traceback: str = "tb") -> None:
    """Run the job's next attempt to a final failure, through the ledger."""
    assert ledger.claim(worker_engine(), job_id, WORKER).claimed
    ledger.record_failure(
        worker_engine(), job_id=job_id, name=name, error=error, traceback=traceback
    )


def created_at(job_ids: Mapping[str, datetime]) -> None:
    """Set the jobs' creation times (spread for a test)."""
    with session_scope() as session:
        for job_id, moment in job_ids.items():
            session.execute(update(Job).where(Job.id == job_id).values(created_at=moment))


def states(job_ids: Sequence[str] | None = None) -> dict[str, str]:
    """Each job's state in the ledger (every job's, by default)."""
    query = select(Job.id, Job.state)
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    with session_scope() as session:
        return {job_id: state for job_id, state in session.execute(query)}


def rows_named(*names: str) -> list[Job]:
    with session_scope() as session:
        found = list(session.scalars(select(Job).where(Job.name.in_(names))))
        session.expunge_all()
        return found


def listed(browser: FlaskClient, query: Mapping[str, str]) -> list[str]:
    """Every job id the list shows for ``query``, page after page (each once)."""
    seen: list[str] = []
    answer = browser.get("/dashboard/jobs", query_string=dict(query))
    while True:
        assert answer.status_code == 200, answer.text
        page = [html.unescape(job_id) for job_id in LISTED.findall(answer.text)]
        assert len(page) <= 50
        seen += page
        following = OLDER.search(answer.text)
        if following is None:
            break
        assert len(page) == 50 or SEARCHED_MORE in answer.text, "a page before the last is full"
        answer = browser.get(html.unescape(following.group(1)))
    assert len(seen) == len(set(seen)), "a job was listed twice"
    return seen


def flashed(browser: FlaskClient, answer: Any) -> str:
    """The page ``answer`` redirects to, with its flash messages."""
    assert answer.status_code == 302, answer.text
    return str(browser.get(answer.headers["Location"]).text)


def test_a_search_page_reads_a_window_of_jobs_and_links_to_the_next(
    celery_app: Celery, operator: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text search reads the arguments of ``SEARCH_WINDOW`` jobs a page (the
    newest meeting the other filters): a page with fewer finds says how far
    back it read and links to the next jobs, and the pages together find
    every match once. A page that finds nothing asks for no jobs by id (an
    empty ``IN``, which PostgreSQL plans as a scan of the whole table under
    row-level security)."""
    monkeypatch.setattr("proj.jobs.console.jobs.SEARCH_WINDOW", 3)
    mark = tag()
    name = f"tests.console.{mark}.search"
    made = [enqueue(celery_app, name, [f"needle-{mark}" if n in (0, 5) else n]) for n in range(7)]
    start = datetime(1999, 1, 2, 3, 4, tzinfo=UTC)  # out of the other tests' time ranges
    created_at({job_id: start + timedelta(hours=n) for n, job_id in enumerate(made)})
    query = {"name": name, "q": f"needle-{mark}"}
    pages = []
    empty_in: list[str] = []

    def look(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "1!=1" in statement.replace(" ", ""):  # how SQLAlchemy writes an empty IN
            empty_in.append(statement)

    event.listen(Engine, "before_cursor_execute", look)
    try:
        answer = operator.get("/dashboard/jobs", query_string=query)
        while True:
            pages.append({html.unescape(job_id) for job_id in LISTED.findall(answer.text)})
            following = OLDER.search(answer.text)
            if following is None:
                break
            assert SEARCHED_MORE in answer.text and "these go back to" in answer.text
            answer = operator.get(html.unescape(following.group(1)))
    finally:
        event.remove(Engine, "before_cursor_execute", look)
    # Read newest first: jobs 6-4 (5 found), 3-1 (none), then 0 alone (found; nothing left).
    assert pages == [{made[5]}, set(), {made[0]}]
    assert empty_in == []
    assert "these go back to" not in answer.text
    assert set(listed(operator, query)) == {made[0], made[5]}


def test_filters_narrow_the_list_as_the_ledger_says(
    celery_app: Celery, operator: FlaskClient, client: FlaskClient
) -> None:
    """State, task, queue, search (an id, an argument, a keyword argument) and
    a creation range each list exactly the ledger's rows that match, together too."""
    mark = tag()
    one, two = f"tests.console.{mark}.one", f"tests.console.{mark}.two"
    made = [
        enqueue(celery_app, one, [f"needle-{mark}", 1]),
        enqueue(celery_app, one, kwargs={"email": f"Someone-{mark}@Example.com"}),
        enqueue(celery_app, one, [3], options={"queue": "long"}),
        enqueue(celery_app, two, ["100%_done"]),
        enqueue(celery_app, two, [5], options={"queue": "long"}),
        enqueue(celery_app, two, [6]),
    ]
    fail(made[2], one)
    fail(made[5], two)
    start = datetime(2001, 3, 4, 5, 6, tzinfo=UTC)
    created_at({job_id: start + timedelta(hours=n) for n, job_id in enumerate(made)})
    rows = {row.id: row for row in rows_named(one, two)}
    assert set(rows) == set(made)

    def matching(test: Any) -> set[str]:
        return {job_id for job_id, row in rows.items() if test(row)}

    def shown(**query: str) -> set[str]:
        return set(listed(operator, query))

    queue_of = {job_id: (row.options or {}).get("queue", "celery") for job_id, row in rows.items()}
    assert shown(name=one) == matching(lambda r: r.name == one) and len(shown(name=one)) == 3
    assert shown(name=two, state="failed") == matching(
        lambda r: r.name == two and r.state == "failed"
    )
    assert shown(name=two, state="queued") == {made[3], made[4]}
    assert shown(name=one, queue="long") == {j for j in made[:3] if queue_of[j] == "long"}
    assert shown(name=one, queue="celery") == {made[0], made[1]}
    assert shown(name=two, queue="nowhere") == set()
    assert shown(q=made[4]) == {made[4]}
    assert shown(q=f"needle-{mark}") == matching(lambda r: f"needle-{mark}" in str(r.args))
    assert shown(q=f"someone-{mark}@example") == {made[1]}  # keyword arguments, any case
    assert shown(name=two, q="100%_") == {made[3]}  # % and _ are literal
    assert shown(name=two, q="0%") == {made[3]}
    assert shown(name=two, q="1_0") == set()
    after = rows[made[1]].created_at
    before = rows[made[4]].created_at
    window = {"since": after.strftime("%Y-%m-%dT%H:%M"), "until": before.strftime("%Y-%m-%dT%H:%M")}
    assert shown(**window) == matching(lambda r: after <= r.created_at < before)
    assert shown(**window) == {made[1], made[2], made[3]}
    assert shown(state="failed", **window) == {made[2]}

    # A job routed by Celery's routes (its row names no queue) is in that queue.
    with session_scope() as session:
        user = User(email=f"console-{mark}@example.com")
        session.add(user)
        session.flush()
        user_id = user.id
    report = client.post("/api/reports", json={"user_id": user_id}).get_json()["job_id"]
    assert shown(queue="long", q=report) == {report}
    assert shown(queue="celery", q=report) == set()
    page = operator.get("/dashboard/jobs", query_string={"q": report}).text
    assert ">proj.tasks.generate_report<" in page and "<td>long</td>" in page


def test_keyset_pages_visit_every_job_once_newest_first(
    celery_app: Celery, operator: FlaskClient
) -> None:
    """120 jobs, many created at the same instant, over three pages: each job
    once, in the ledger's (created_at, id) order, newest first."""
    name = f"tests.console.{tag()}.paged"
    made = [enqueue(celery_app, name, [n]) for n in range(120)]
    start = datetime(2002, 1, 1, tzinfo=UTC)
    created_at({job_id: start + timedelta(seconds=n // 7) for n, job_id in enumerate(made)})
    expected = [
        row.id for row in sorted(rows_named(name), key=lambda r: (r.created_at, r.id), reverse=True)
    ]

    seen = listed(operator, {"name": name})

    assert seen == expected and len(seen) == 120
    # Unfiltered, the first page is the ledger's newest 50, and the second follows it.
    newest = select(Job.id).order_by(Job.created_at.desc(), Job.id.desc()).limit(100)
    with session_scope() as session:
        ledger_order = list(session.scalars(newest))
    first = operator.get("/dashboard/jobs").text
    second = operator.get(html.unescape(OLDER.findall(first)[0])).text
    shown = [html.unescape(i) for i in LISTED.findall(first) + LISTED.findall(second)]
    assert shown == ledger_order[: len(shown)] and len(shown) == min(100, len(ledger_order))


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ({"state": "nope"}, "state must be one of waiting, queued"),
        ({"state": "FAILED"}, "state must be one of"),
        ({"since": "yesterday"}, "since must be a date and time like"),
        ({"until": "2020-13-01T00:00"}, "until must be a date and time like"),
        ({"since": "2020-01-02T00:00", "until": "2020-01-01T00:00"}, "until must be later"),
        ({"name": "x" * 300}, "name takes at most 255 characters"),
        ({"q": "x" * 300}, "q takes at most 255 characters"),
        ({"before": "no-such-job"}, "the job this page continued after is gone"),
        ({"before": "\x00"}, "the job this page continued after is gone"),
        ({"name": "a\x00b"}, "name cannot hold a NUL character"),
        ({"q": "\x00"}, "q cannot hold a NUL character"),
        ({"since": "0001-01-01T00:00+05:00"}, "since must be a date and time like"),
    ],
)
def test_a_filter_that_cannot_be_used_is_400_saying_why(
    viewer: FlaskClient, query: dict[str, str], problem: str
) -> None:
    """The page answers 400 with its form and what is wrong, never a 500."""
    answer = viewer.get("/dashboard/jobs", query_string=query)
    assert answer.status_code == 400
    assert problem in html.unescape(answer.text)
    assert 'role="search"' in answer.text and not LISTED.search(answer.text)


def test_a_bulk_form_with_a_filter_that_cannot_be_used_is_400(
    celery_app: Celery, operator: FlaskClient
) -> None:
    name = f"tests.console.{tag()}.bad"
    job_id = enqueue(celery_app, name)
    for path in ("/dashboard/jobs/confirm", "/dashboard/jobs/act"):
        answer = operator.post(
            path,
            data={
                "csrf_token": token(operator),
                "action": "cancel",
                "scope": "matching",
                "name": name,
                "since": "soon",
            },
        )
        assert answer.status_code == 400
        assert "since must be a date and time" in html.unescape(answer.text)
    answer = operator.post(
        "/dashboard/jobs/confirm",
        data={"csrf_token": token(operator), "action": "delete", "scope": "matching"},
    )
    assert answer.status_code == 400 and "action must be one of retry, cancel" in answer.text
    nothing_ticked = operator.post(
        "/dashboard/jobs/act",
        data={
            "csrf_token": token(operator),
            "action": "cancel",
            "scope": "selected",
            "job_id": ["\x00", "x" * 300],
        },
    )
    assert "tick the jobs to act on first" in flashed(operator, nothing_ticked)
    assert states([job_id]) == {job_id: "queued"}


def test_the_job_page_shows_arguments_every_attempt_and_buttons_for_operators(
    celery_app: Celery, operator: FlaskClient, viewer: FlaskClient
) -> None:
    """Arguments (escaped), both attempts' errors and tracebacks, the worker
    and the timeline; Retry for a failed job, for an operator only."""
    name = f"tests.console.{tag()}.page"
    job_id = enqueue(celery_app, name, ["first-arg", 42], {"note": "<b>bold</b>"}, max_attempts=2)
    assert ledger.claim(worker_engine(), job_id, WORKER).claimed
    assert ledger.retrying(
        worker_engine(), job_id, 1, "KeyError: 'first'", "Traceback one\n  line 1", utcnow()
    )
    fail(job_id, name, "ValueError: second", "Traceback two\n  line 2")

    page = operator.get(f"/dashboard/jobs/{job_id}")

    assert page.status_code == 200
    text = page.text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text
    shown = html.unescape(text)
    assert '[\n  "first-arg",\n  42\n]' in shown and '"note": "<b>bold</b>"' in shown
    for error in ("KeyError: 'first'", "Traceback one", "ValueError: second", "Traceback two"):
        assert error in shown
    assert text.count('<section class="attempt"') == 2
    assert WORKER in text and name in text and ">celery<" in text
    assert "attempt 1 ended in an error" in text and "attempt 2 started" in text
    assert f'action="/dashboard/jobs/{job_id}/retry"' in text
    assert f'action="/dashboard/jobs/{job_id}/cancel"' not in text

    seen_by_viewer = viewer.get(f"/dashboard/jobs/{job_id}").text
    assert "Traceback two" in seen_by_viewer
    assert "/retry" not in seen_by_viewer and "/cancel" not in seen_by_viewer


def test_a_running_job_shows_its_progress_and_a_cancel_button(
    celery_app: Celery, operator: FlaskClient
) -> None:
    name = f"tests.console.{tag()}.running"
    job_id = enqueue(celery_app, name, max_attempts=3)
    assert ledger.claim(worker_engine(), job_id, WORKER).claimed
    ledger.set_progress(worker_engine(), job_id, 1, 40.0)

    text = operator.get(f"/dashboard/jobs/{job_id}").text

    assert '<progress id="job-progress" max="100" value="40.0">' in text
    assert f'action="/dashboard/jobs/{job_id}/cancel"' in text
    assert f'action="/dashboard/jobs/{job_id}/retry"' not in text


def test_an_unknown_job_is_a_404_page(viewer: FlaskClient) -> None:
    unknown = str(uuid.uuid4())
    answer = viewer.get(f"/dashboard/jobs/{unknown}")
    assert answer.status_code == 404 and f"no job with id {unknown}" in answer.text
    assert viewer.get(f"/dashboard/jobs/{'x' * 300}").status_code == 404
    assert viewer.get("/dashboard/jobs/%00").status_code == 404


def test_the_list_offers_ticks_and_bulk_actions_to_operators_only(
    celery_app: Celery, operator: FlaskClient, viewer: FlaskClient
) -> None:
    name = f"tests.console.{tag()}.ticks"
    job_id = enqueue(celery_app, name)
    for_operator = operator.get("/dashboard/jobs", query_string={"name": name}).text
    for_viewer = viewer.get("/dashboard/jobs", query_string={"name": name}).text
    tick = f'name="job_id" value="{job_id}"'
    assert tick in for_operator and "/dashboard/jobs/confirm" in for_operator
    assert LISTED.findall(for_viewer) == [job_id]
    assert tick not in for_viewer and "/dashboard/jobs/confirm" not in for_viewer


def test_retry_queues_a_failed_job_and_cancel_cancels_a_queued_one(
    celery_app: Celery, operator: FlaskClient, memory: InMemoryQueue
) -> None:
    """Each a compare-and-set: done once, then explained (flashed) and not done again."""
    name = f"tests.console.{tag()}.single"
    failed, waiting = enqueue(celery_app, name), enqueue(celery_app, name)
    fail(failed, name)
    memory.clear()

    page = flashed(
        operator,
        operator.post(f"/dashboard/jobs/{failed}/retry", data={"csrf_token": token(operator)}),
    )

    assert "is queued again" in page
    row = proj.jobs.testing.job(failed)
    assert (row.state, row.attempts, row.max_attempts, row.finished_at) == ("queued", 1, 2, None)
    assert [job.id for job in memory.enqueued_jobs(name)] == [failed]  # published after the commit
    again = operator.post(f"/dashboard/jobs/{failed}/retry", data={"csrf_token": token(operator)})
    assert "is queued; only a failed job is retried" in flashed(operator, again)
    assert proj.jobs.testing.job(failed).max_attempts == 2

    page = flashed(
        operator,
        operator.post(f"/dashboard/jobs/{waiting}/cancel", data={"csrf_token": token(operator)}),
    )

    assert "is cancelled; it will never run" in page
    assert proj.jobs.testing.job(waiting).state == "cancelled"
    again = operator.post(f"/dashboard/jobs/{waiting}/cancel", data={"csrf_token": token(operator)})
    assert "only a waiting or running job is cancelled" in flashed(operator, again)
    assert states([failed, waiting]) == {failed: "queued", waiting: "cancelled"}


def test_a_message_no_worker_could_read_is_listed_and_never_retried(
    celery_app: Celery, operator: FlaskClient
) -> None:
    """Its body holds a NUL (which PostgreSQL's json operators refuse): the
    list still answers, no bulk retry counts it, and its own retry is refused."""
    job_id = str(uuid.uuid4())
    ledger.record_failure(
        worker_engine(),
        job_id=job_id,
        name="?",
        error="undecodable message",
        options={UNRUNNABLE: {"reason": "undecodable", "body": "\x00 _%"}},
    )
    assert listed(operator, {"q": job_id}) == [job_id]
    assert listed(operator, {"q": job_id, "queue": "celery"}) == [job_id]
    assert job_id in listed(operator, {"state": "failed"})
    confirmation = operator.post(
        "/dashboard/jobs/confirm",
        data={"csrf_token": token(operator), "action": "retry", "scope": "matching", "q": job_id},
    )
    assert 'data-count="0"' in confirmation.text and "Nothing to do" in confirmation.text
    page = operator.get(f"/dashboard/jobs/{job_id}").text
    assert "/retry" not in page and "unrunnable_message" in page
    answer = operator.post(f"/dashboard/jobs/{job_id}/retry", data={"csrf_token": token(operator)})
    assert "a message no worker could read" in flashed(operator, answer)
    done = operator.post(
        "/dashboard/jobs/act",
        data={
            "csrf_token": token(operator),
            "action": "retry",
            "scope": "selected",
            "job_id": job_id,
        },
    )
    assert "retried 0 jobs; 1 job is a message no worker could read" in flashed(operator, done)
    assert states([job_id]) == {job_id: "failed"}


def confirm_and_act(browser: FlaskClient, form: dict[str, Any], expected: int) -> tuple[str, str]:
    """Post a bulk form to the confirmation, check its count, confirm; the two pages."""
    form = {**form, "csrf_token": token(browser)}
    confirmation = browser.post("/dashboard/jobs/confirm", data=form)
    assert confirmation.status_code == 200, confirmation.text
    assert f'data-count="{expected}"' in confirmation.text
    fields = dict(
        re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', confirmation.text)
    )
    assert fields["expected"] == str(expected)
    fields["job_id"] = [
        html.unescape(v)
        for v in re.findall(
            r'<input type="hidden" name="job_id" value="([^"]*)">', confirmation.text
        )
    ]
    done = browser.post("/dashboard/jobs/act", data={k: v for k, v in fields.items()})
    return confirmation.text, flashed(browser, done)


def test_bulk_retry_of_ticked_jobs_counts_and_skips_what_changed(
    celery_app: Celery, operator: FlaskClient, memory: InMemoryQueue
) -> None:
    """Three ticked (two failed, one queued): the confirmation counts two; one
    of them is retried elsewhere before the confirm, so one is retried and two
    are told as skipped; no other row changes."""
    name = f"tests.console.{tag()}.ticked"
    first, second, third, waiting = (enqueue(celery_app, name) for _ in range(4))
    for job_id in (first, second, third):
        fail(job_id, name)
    form = {"action": "retry", "scope": "selected", "name": name}
    confirmation = operator.post(
        "/dashboard/jobs/confirm",
        data={**form, "csrf_token": token(operator), "job_id": [first, second, waiting]},
    )
    assert 'data-count="2"' in confirmation.text
    assert "Of the <strong>3</strong> jobs ticked" in confirmation.text
    with session_scope() as session:  # someone else retries one meanwhile
        assert ledger.requeue(session, second)
    memory.clear()
    before = states()

    done = operator.post(
        "/dashboard/jobs/act",
        data={
            **form,
            "csrf_token": token(operator),
            "expected": "2",
            "job_id": [first, second, waiting],
        },
    )

    assert "retried 1 job; 2 jobs were not failed" in flashed(operator, done)
    after = states()
    assert {k for k in after if after[k] != before.get(k)} == {first}
    assert after[first] == "queued" and after[third] == "failed"
    assert [job.id for job in memory.enqueued_jobs(name)] == [first]


def test_bulk_cancel_of_every_matching_job_changes_exactly_those(
    celery_app: Celery, operator: FlaskClient
) -> None:
    """Five queued and two failed jobs of a task: cancelling all matching the
    task counts five, cancels the five, and changes no other row."""
    name = f"tests.console.{tag()}.matching"
    waiting = [enqueue(celery_app, name) for _ in range(5)]
    failed = [enqueue(celery_app, name) for _ in range(2)]
    for job_id in failed:
        fail(job_id, name)
    before = states()

    confirmation, page = confirm_and_act(
        operator, {"action": "cancel", "scope": "matching", "name": name}, 5
    )

    assert "name: <code>" + name in confirmation
    assert "cancelled 5 jobs" in page and "were no longer" not in page
    after = states()
    assert {k for k in after if after[k] != before.get(k)} == set(waiting)
    assert {after[k] for k in waiting} == {"cancelled"}
    assert {after[k] for k in failed} == {"failed"}


@pytest.mark.parametrize("expected", ["²", "1" * 5000], ids=["superscript", "5000-digits"])
def test_a_count_that_is_no_number_is_taken_as_none(operator: FlaskClient, expected: str) -> None:
    """The form brings the confirmation's count back; one int() cannot read
    (a digit only to isdigit(), more digits than int() reads) counts none."""
    done = operator.post(
        "/dashboard/jobs/act",
        data={
            "csrf_token": token(operator),
            "action": "cancel",
            "scope": "matching",
            "name": f"tests.console.{tag()}.none",
            "expected": expected,
        },
    )
    page = flashed(operator, done)
    assert "cancelled 0 jobs" in page and "no longer" not in page


def test_a_bulk_action_takes_at_most_a_batch_the_newest_first(
    celery_app: Celery, operator: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "BATCH_LIMIT", 3)
    name = f"tests.console.{tag()}.capped"
    made = [enqueue(celery_app, name) for _ in range(5)]
    for job_id in made:
        fail(job_id, name)
    created_at({job_id: datetime(2003, 1, 1, n, tzinfo=UTC) for n, job_id in enumerate(made)})

    confirmation, page = confirm_and_act(
        operator, {"action": "retry", "scope": "matching", "name": name, "state": "failed"}, 3
    )

    assert "only the newest 3 will be retried" in confirmation
    assert "retried 3 jobs" in page and "only the newest 3 were taken" in page
    assert states(made) == {
        job_id: "queued" if n >= 2 else "failed" for n, job_id in enumerate(made)
    }


def test_a_viewers_forged_posts_are_403_and_change_nothing(
    celery_app: Celery, viewer: FlaskClient
) -> None:
    """With a valid CSRF token from the viewer's own page, every action is refused."""
    name = f"tests.console.{tag()}.forged"
    failed, waiting = enqueue(celery_app, name), enqueue(celery_app, name)
    fail(failed, name)
    csrf = token(viewer)
    before = states()
    for path, data in [
        (f"/dashboard/jobs/{failed}/retry", {}),
        (f"/dashboard/jobs/{waiting}/cancel", {}),
        ("/dashboard/jobs/confirm", {"action": "retry", "scope": "selected", "job_id": failed}),
        ("/dashboard/jobs/act", {"action": "retry", "scope": "selected", "job_id": failed}),
        ("/dashboard/jobs/act", {"action": "cancel", "scope": "matching", "name": name}),
    ]:
        answer = viewer.post(path, data={**data, "csrf_token": csrf})
        assert answer.status_code == 403, path
        assert "a viewer may look but not act" in answer.text
    assert states() == before
    assert states([failed, waiting]) == {failed: "failed", waiting: "queued"}


def test_a_post_without_its_csrf_token_is_400_and_changes_nothing(
    celery_app: Celery, operator: FlaskClient
) -> None:
    name = f"tests.console.{tag()}.csrf"
    failed, waiting = enqueue(celery_app, name), enqueue(celery_app, name)
    fail(failed, name)
    before = states()
    for path, data in [
        (f"/dashboard/jobs/{failed}/retry", {}),
        (f"/dashboard/jobs/{waiting}/cancel", {"csrf_token": "forged"}),
        ("/dashboard/jobs/act", {"action": "retry", "scope": "selected", "job_id": failed}),
        ("/dashboard/jobs/act", {"action": "cancel", "scope": "matching", "name": name}),
    ]:
        answer = operator.post(path, data=data)
        assert answer.status_code == 400, path
        assert "CSRF token" in answer.text
    assert states() == before
    with session_scope() as session:
        attempts = session.scalars(select(JobAttempt.outcome).where(JobAttempt.job_id == failed))
        assert list(attempts) == ["failed"]
