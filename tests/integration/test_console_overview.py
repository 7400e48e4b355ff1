"""The console's overview, periodic and workers pages on real databases: a
known mix of jobs is written into the ledger, and every figure the pages
show equals what the ledger's rows say (counted here, row by row); the
chart's bars are the minutes the jobs finished in; beat entries show their
last slot's job and workers their heartbeat and their running jobs."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import crontab
from consoles import signed_in
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, select

import proj.jobs.testing
from proj.db import db as web_db
from proj.jobs import Jobs, auth
from proj.jobs.clock import utcnow
from proj.jobs.console import figures
from proj.jobs.models import Job, State, WorkerBeat
from proj.jobs.reconciler import queue_of
from proj.jobs.scheduler import SlotScheduler, slot_job_id

PAGES = ("/dashboard/", "/dashboard/periodic", "/dashboard/workers", "/dashboard/tokens")
WAITING_OR_RUNNING = {State.QUEUED, State.RUNNING, State.RETRYING}
OUTCOMES = {State.SUCCEEDED, State.FAILED, State.CANCELLED}
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})


@dataclass
class Element:
    """An element of a page: its tag, attributes, text and children."""

    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())

    def walk(self) -> Iterator[Element]:
        for child in self.children:
            yield child
            yield from child.walk()

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Elements inside this one with ``tag`` and ``attrs`` (``data_state``
        is ``data-state``; ``class_`` is one of the classes)."""
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}
        return [
            found
            for found in self.walk()
            if (tag is None or found.tag == tag)
            and all(
                value in found.attrs.get(name, "").split()
                if name == "class"
                else found.attrs.get(name) == value
                for name, value in wanted.items()
            )
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> found"
        return found[0]

    def having(self, tag: str, attribute: str) -> list[Element]:
        """Elements inside this one with ``tag`` that carry ``attribute``."""
        return [found for found in self.find(tag) if attribute in found.attrs]


class Page(HTMLParser):
    """A page's elements as a tree (the root is :attr:`document`)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.document = Element("document", {})
        self._open = [self.document]
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self._open[-1].children.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.texts.append(data)


def page_of(client: FlaskClient, path: str) -> Element:
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return Page(response.get_data(as_text=True)).document


class Ledger:
    """Rows a test writes into the stack's ledger, deleted when it ends (so
    that no later test's relay or reconciler sends them anywhere)."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.job_ids: list[str] = []
        self.hostnames: list[str] = []

    def add(self, *rows: Mapping[str, Any]) -> list[str]:
        """Insert a job for each of ``rows`` (fields of :class:`Job`); their ids."""
        now = utcnow()
        made = []
        with self.jobs.session_scope() as session:
            for row in rows:
                fields = {
                    "id": f"console-{uuid.uuid4()}",
                    "name": "tests.console.nothing",
                    "state": State.QUEUED,
                    "created_at": now,
                    "published_at": now,
                    **row,
                }
                session.add(Job(**fields))
                made.append(fields["id"])
        self.job_ids.extend(made)
        return made

    def track(self, job_id: str) -> None:
        """Delete the job ``job_id`` (made elsewhere) at the end too."""
        self.job_ids.append(job_id)

    def heartbeat(self, hostname: str, **fields: Any) -> None:
        with self.jobs.session_scope() as session:
            session.add(WorkerBeat(hostname=hostname, **fields))
        self.hostnames.append(hostname)

    def rows(self) -> list[Any]:
        """Every job in the ledger (this test's and any other's)."""
        columns = (Job.name, Job.options, Job.state, Job.created_at, Job.finished_at)
        owed = (Job.published_at, Job.available_at, Job.concurrency_key, Job.rate_key)
        with self.jobs.session_scope() as session:
            return list(session.execute(select(*columns, *owed)).all())

    def remove(self) -> None:
        with self.jobs.session_scope() as session:
            session.execute(delete(Job).where(Job.id.in_(self.job_ids)))
            session.execute(delete(WorkerBeat).where(WorkerBeat.hostname.in_(self.hostnames)))


@pytest.fixture
def ledger(celery_app: Celery) -> Iterator[Ledger]:
    made = Ledger(Jobs.of(celery_app))
    yield made
    made.remove()


def expected_overview(
    rows: list[Any], celery_app: Celery, at: datetime, since: datetime
) -> dict[str, Any]:
    """The overview's figures at ``at``, counted from the ledger's rows one by
    one: waiting and running jobs as they are, finished ones since ``since``,
    owed ones due by ``at`` (the relay lag from the earliest of those with no
    concurrency or rate key; no queue is paused)."""
    until = since + timedelta(minutes=60)
    by_state: Counter[str] = Counter({str(state): 0 for state in State})
    by_queue: dict[str, Counter[str]] = {}
    per_minute: Counter[tuple[str, str]] = Counter()
    owed = []
    for row in rows:
        finished_at = row.finished_at if row.state in OUTCOMES else None
        counted = row.state in WAITING_OR_RUNNING or (
            finished_at is not None and finished_at >= since
        )
        if counted:
            by_state[row.state] += 1
            queue = queue_of(celery_app, row.name, row.options)
            by_queue.setdefault(queue, Counter())[row.state] += 1
        if finished_at is not None and since <= finished_at < until:
            minute = finished_at.replace(second=0, microsecond=0)
            per_minute[minute.isoformat(), row.state] += 1
        waits = row.state in (State.QUEUED, State.RETRYING) and row.available_at <= at
        if waits and row.published_at is None:
            owed.append(row)
    waiting = {
        queue: states[State.QUEUED] + states[State.RETRYING] for queue, states in by_queue.items()
    }
    return {
        "by_state": dict(by_state),
        "by_queue": {queue: dict(+states) for queue, states in by_queue.items()},
        "per_minute": dict(per_minute),
        "waiting": {queue: count for queue, count in waiting.items() if count},
        "owed": len(owed),
        "oldest_owed": min(
            (row.available_at for row in owed if not (row.concurrency_key or row.rate_key)),
            default=None,
        ),
    }


def shown_overview(page: Element) -> dict[str, Any]:
    """The same figures, as the overview page shows them (its data- attributes)."""
    cards = page.one("ul", class_="cards").having("a", "data-state")
    table = page.one("table", id="by-queue")
    by_queue = {
        row.attrs["data-queue"]: {
            cell.attrs["data-state"]: int(cell.attrs["data-count"])
            for cell in row.having("td", "data-state")
            if cell.attrs["data-count"] != "0"
        }
        for row in table.having("tr", "data-queue")
    }
    chart = page.one("svg", id="finished-chart")
    per_minute = {
        (bar.attrs["data-minute"], bar.attrs["data-state"]): int(bar.attrs["data-count"])
        for bar in chart.having("rect", "data-minute")
    }
    pictures = page.find("svg", id="waiting-chart")
    waiting = {
        bar.attrs["data-queue"]: int(bar.attrs["data-count"])
        for picture in pictures
        for bar in picture.having("rect", "data-queue")
    }
    oldest = page.one(id="relay-lag").attrs["data-oldest"]
    return {
        "by_state": {card.attrs["data-state"]: int(card.attrs["data-count"]) for card in cards},
        "by_queue": by_queue,
        "per_minute": per_minute,
        "waiting": waiting,
        "owed": int(page.one(id="relay-owed").attrs["data-count"]),
        "oldest_owed": datetime.fromisoformat(oldest) if oldest else None,
    }


def minute_of(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(second=0, microsecond=0).isoformat()


def test_the_overview_shows_the_ledger_s_figures(
    app: Flask, celery_app: Celery, ledger: Ledger
) -> None:
    """With a known mix of jobs in the ledger (waiting, running, finished
    within the hour and before it, owed to the broker), the overview's state
    cards, queue-by-state table, per-minute chart, waiting picture, relay
    figures and failure rate all equal what the ledger's rows say, and this
    test's own queue shows exactly its mix."""
    now = utcnow()
    queue, owed_queue = f"console-{uuid.uuid4().hex[:8]}", f"console-owed-{uuid.uuid4().hex[:8]}"
    ago = {n: now - timedelta(minutes=n) for n in (2, 7, 12, 30, 45, 120)}
    mine = {"options": {"queue": queue}}
    # The last moment of a minute counts in that minute (SQLite's date
    # functions would round it into the next one).
    edge = ago[7].replace(second=59, microsecond=999_700)
    finished = [
        (State.SUCCEEDED, edge),
        (State.SUCCEEDED, ago[2]),
        (State.SUCCEEDED, ago[2]),
        (State.SUCCEEDED, ago[7]),
        (State.SUCCEEDED, ago[30]),
        (State.FAILED, ago[7]),
        (State.FAILED, ago[45]),
        (State.CANCELLED, ago[12]),
    ]
    owed_since = now - timedelta(seconds=90)
    ledger.add(
        *({**mine, "state": State.QUEUED} for _ in range(3)),
        *({**mine, "state": State.RETRYING} for _ in range(2)),
        {**mine, "state": State.RUNNING, "started_at": ago[2], "worker": "celery@x:1"},
        *(
            {**mine, "state": state, "created_at": at - timedelta(seconds=5), "finished_at": at}
            for state, at in finished
        ),
        # Finished two hours ago: in no figure of the last hour. One created
        # three days before it finished just now is in them.
        {**mine, "state": State.SUCCEEDED, "created_at": ago[120], "finished_at": ago[120]},
        {**mine, "state": State.FAILED, "created_at": now - timedelta(days=3), "finished_at": now},
        # Owed to the broker (the oldest due for 90 s), in a queue of their
        # own, and one due in an hour, owed nothing yet.
        {
            "options": {"queue": owed_queue},
            "published_at": None,
            "created_at": owed_since,
            "available_at": owed_since,
        },
        {"options": {"queue": owed_queue}, "published_at": None, "state": State.RETRYING},
        {
            "options": {"queue": owed_queue},
            "published_at": None,
            "created_at": now - timedelta(hours=2),
            "available_at": now + timedelta(hours=1),
        },
        # No queue of its own: the task's route says where it goes.
        {"name": "proj.tasks.generate_report", "options": {}},
    )
    client = signed_in(app, "viewer")

    response = client.get("/dashboard/")

    assert response.status_code == 200
    page = Page(response.get_data(as_text=True)).document
    summary = page.one("p", id="as-of")
    at = datetime.fromisoformat(summary.attrs["data-at"])
    since = datetime.fromisoformat(summary.attrs["data-since"])
    assert since == datetime.fromisoformat(minute_of(at)) - timedelta(minutes=59)
    shown = shown_overview(page)
    assert shown == expected_overview(ledger.rows(), celery_app, at, since)
    # This test's queue: exactly its mix; the owed rows and the routed job where they go.
    assert shown["by_queue"][queue] == {
        "queued": 3, "retrying": 2, "running": 1, "succeeded": 5, "failed": 3, "cancelled": 1,
    }  # fmt: skip
    assert shown["by_queue"][owed_queue] == {"queued": 2, "retrying": 1}
    assert shown["by_queue"]["long"]["queued"] >= 1
    assert (shown["waiting"][queue], shown["waiting"][owed_queue]) == (5, 3)
    for state, at_minute in finished:
        assert shown["per_minute"][minute_of(at_minute), str(state)] >= 1
    assert shown["per_minute"][minute_of(ago[2]), "succeeded"] >= 2
    assert shown["owed"] >= 2 and shown["oldest_owed"] <= owed_since
    assert page.find(id="capped") == [], "nothing was counted to the cap"
    # The chart's bars add up to the finished cards; the failure rate is theirs.
    bars: Counter[str] = Counter()
    for (_, state), count in shown["per_minute"].items():
        bars[state] += count
    assert all(bars[str(state)] == shown["by_state"][state] for state in OUTCOMES)
    rate = page.one(id="failure-rate").attrs
    finished_count = sum(shown["by_state"][state] for state in OUTCOMES)
    assert (int(rate["data-failed"]), int(rate["data-finished"])) == (
        shown["by_state"]["failed"],
        finished_count,
    )
    assert float(rate["data-rate"]) == pytest.approx(
        shown["by_state"]["failed"] / finished_count, abs=1e-4
    )
    lag = float(page.one(id="relay-lag").attrs["data-seconds"])
    assert lag == pytest.approx((at - shown["oldest_owed"]).total_seconds(), abs=1e-3)
    assert 90 <= lag < 3600, "the relay lag runs from when a job fell due"
    # Each state card leads to the jobs list filtered by its state; each table
    # cell to the list filtered by queue and state.
    for card in page.one("ul", class_="cards").having("a", "data-state"):
        target = urlsplit(card.attrs["href"])
        assert target.path == "/dashboard/jobs"
        assert parse_qs(target.query) == {"state": [card.attrs["data-state"]]}
    by_queue = page.one("table", id="by-queue")
    cell = by_queue.one("tr", data_queue=queue).one("td", data_state="failed").one("a")
    assert parse_qs(urlsplit(cell.attrs["href"]).query) == {"queue": [queue], "state": ["failed"]}
    assert page.one("meta", http_equiv="refresh").attrs["content"] == "10"
    # The queues table's waiting jobs are the figures' (the routed queue's).
    pausable = page.one("table", id="queue-pauses").one("tr", data_queue=queue)
    assert pausable.one("td", data_count="5").text == "5"


def test_the_overview_follows_the_ledger(app: Flask, celery_app: Celery, ledger: Ledger) -> None:
    """No figure is fixed: jobs added to the ledger between two views move
    the cards, the chart and the relay's figures by exactly that much."""
    client = signed_in(app, "viewer")
    # Both views in one minute: the hour's window does not move between them.
    moment = utcnow()
    if moment.second >= 55:
        time.sleep(60.1 - moment.second - moment.microsecond / 1e6)
    before = shown_overview(page_of(client, "/dashboard/"))
    now = utcnow()
    ledger.add(
        {"state": State.FAILED, "finished_at": now, "options": {"queue": "console-moves"}},
        {"state": State.SUCCEEDED, "finished_at": now},
        {"state": State.QUEUED, "published_at": None},
    )

    after = shown_overview(page_of(client, "/dashboard/"))

    moved = {
        state: after["by_state"][state] - before["by_state"][state] for state in after["by_state"]
    }
    assert moved == {
        "waiting": 0, "queued": 1, "running": 0, "retrying": 0, "succeeded": 1, "failed": 1,
        "cancelled": 0,
    }  # fmt: skip
    assert after["owed"] == before["owed"] + 1
    minute = (minute_of(now), "failed")
    assert after["per_minute"][minute] == before["per_minute"].get(minute, 0) + 1
    assert after["by_queue"]["console-moves"] == {"failed": 1}


def test_a_backlog_past_the_cap_is_shown_as_at_least_the_cap(
    app: Flask, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overview counts at most ``COUNT_CAP`` jobs of a waiting or running
    state, and owed ones (lowered to 3 here): past it, the card shows
    "3+", says so, and the page notes which states have more; a state
    under the cap is counted exactly."""
    monkeypatch.setattr(figures, "COUNT_CAP", 3)
    queue = f"console-backlog-{uuid.uuid4().hex[:8]}"
    ledger.add(*({"options": {"queue": queue}, "published_at": None} for _ in range(5)))
    client = signed_in(app, "viewer")

    page = page_of(client, "/dashboard/")

    queued = page.one("a", data_state="queued")
    assert (queued.attrs["data-count"], queued.attrs.get("data-capped")) == ("4", "yes")
    assert queued.one("span", class_="figure").text == "3+"
    owed = page.one(id="relay-owed")
    assert (owed.attrs["data-count"], owed.attrs.get("data-capped")) == ("4", "yes")
    assert owed.one("span", class_="figure").text == "3+"
    assert "more are queued" in page.one("p", id="capped").text
    failed = page.one("a", data_state="failed")
    assert "data-capped" not in failed.attrs
    assert failed.one("span", class_="figure").text == failed.attrs["data-count"]


def test_the_periodic_page_shows_each_entry_s_last_run(
    app: Flask, celery_app: Celery, ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every beat entry is listed; an entry's last run is the newest job among
    its slots' (first one written in an earlier slot, then the one beat's slot
    scheduler sends now), with its state, a link to it and the next run."""
    tag = uuid.uuid4().hex[:8]
    every, tick, cron_tick = (
        timedelta(minutes=5),
        f"tests.console.tick_{tag}",
        f"tests.console.cron_{tag}",
    )
    schedule = celery_app.conf.beat_schedule
    monkeypatch.setitem(schedule, f"tick-{tag}", {"task": tick, "schedule": every})
    monkeypatch.setitem(schedule, f"cron-{tag}", {"task": cron_tick, "schedule": crontab("*/15")})
    entry = ScheduleEntry(name=f"tick-{tag}", app=celery_app, task=tick, schedule=every)
    cron_entry = ScheduleEntry(
        name=f"cron-{tag}", app=celery_app, task=cron_tick, schedule=crontab("*/15")
    )
    now = utcnow()
    earlier_at = now - every
    fired_at = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    earlier, cron_run = ledger.add(
        {
            "id": slot_job_id(entry, earlier_at),
            "name": tick,
            "state": State.SUCCEEDED,
            "created_at": earlier_at,
            "finished_at": earlier_at,
        },
        {"id": slot_job_id(cron_entry, fired_at), "name": cron_tick, "created_at": fired_at},
    )
    client = signed_in(app, "viewer")

    page = page_of(client, "/dashboard/periodic")

    listed = {row.attrs["data-entry"] for row in page.having("tr", "data-entry")}
    assert listed == set(schedule)
    row = page.one("tr", data_entry=f"tick-{tag}")
    assert row.one("td", data_task=tick).one("a").text == tick
    assert row.one("td", data_schedule="every 5 min")
    last = row.one("td", class_="last-run")
    assert (last.attrs["data-job-id"], last.attrs["data-state"]) == (earlier, "succeeded")
    assert last.one("a").attrs["href"].endswith(earlier)
    next_run = row.one("td", class_="next-run").attrs["data-next"]
    assert datetime.fromisoformat(next_run) == earlier_at + every
    cron_row = page.one("tr", data_entry=f"cron-{tag}")
    assert cron_row.one("td", data_schedule="crontab */15 * * * * (UTC)")
    assert cron_row.one("td", class_="last-run").attrs["data-job-id"] == cron_run
    cron_next = datetime.fromisoformat(cron_row.one("td", class_="next-run").attrs["data-next"])
    assert cron_next == fired_at + timedelta(minutes=15)

    with proj.jobs.testing.in_memory(celery_app):
        beat = SlotScheduler(app=celery_app, schedule_filename=str(tmp_path / "beat"), lazy=True)
        sent = beat.apply_async(entry, advance=False)
    assert sent is not None
    ledger.track(sent.id)

    last = page_of(client, "/dashboard/periodic").one("tr", data_entry=f"tick-{tag}")
    assert last.one("td", class_="last-run").attrs["data-job-id"] == sent.id
    assert last.one("td", class_="last-run").attrs["data-state"] == "queued"


def test_the_workers_page_shows_heartbeats_and_running_jobs(
    app: Flask, celery_app: Celery, ledger: Ledger
) -> None:
    """A worker that beat just now is alive and shows the job it runs; one
    whose last beat is older than ``stale_after`` is silent; a running job of
    a worker with no heartbeat (even one whose name starts like a live
    worker's) is listed apart."""
    tag = uuid.uuid4().hex[:8]
    alive, silent = f"celery@console-{tag}", f"celery@console-silent-{tag}"
    now = utcnow()
    stale_after = Jobs.of(celery_app).settings.stale_after
    ledger.heartbeat(alive, pid=4242, started_at=now - timedelta(minutes=10), beat_at=now)
    ledger.heartbeat(
        silent,
        pid=4343,
        started_at=now - timedelta(hours=1),
        beat_at=now - timedelta(seconds=stale_after + 60),
    )
    running = {"state": State.RUNNING, "attempts": 1, "started_at": now}
    job, lookalike = ledger.add(
        {**running, "worker": f"{alive}:4250"}, {**running, "worker": f"{alive}0:4250"}
    )
    client = signed_in(app, "viewer")

    page = page_of(client, "/dashboard/workers")

    row = page.one("tr", data_worker=alive)
    assert (row.attrs["data-alive"], row.attrs["data-running"]) == ("yes", "1")
    assert row.one("a", data_job_id=job).attrs["href"].endswith(job)
    assert "4242" in row.text
    other = page.one("tr", data_worker=silent)
    assert (other.attrs["data-alive"], other.attrs["data-running"]) == ("no", "0")
    assert page.one("table", id="unbeating").one("tr", data_job_id=lookalike)


def test_the_tokens_page_lists_each_token_and_never_the_token(app: Flask) -> None:
    """Name, role, tenant, last use and expiry of every token; the token
    itself is nowhere on the page (only its hash is kept anyway)."""
    tag = uuid.uuid4().hex[:8]
    with app.app_context():
        used = auth.add_token(web_db.session, f"used-{tag}", "operator", tenant="acme")
        auth.add_token(web_db.session, f"expired-{tag}", "viewer", expires_in=timedelta(0))
        web_db.session.commit()
    assert (
        app.test_client()
        .get("/api/jobs?limit=1", headers={"Authorization": f"Bearer {used}"})
        .status_code
        == 200
    )
    client = signed_in(app, "viewer")

    page = page_of(client, "/dashboard/tokens")

    row = page.one("tr", data_token=f"used-{tag}")
    cells = [cell.text for cell in row.find("td")]
    assert cells[:2] == ["operator", "acme"]
    assert "never" not in cells[3] and cells[4] == "never"
    expired = page.one("tr", data_token=f"expired-{tag}")
    assert expired.attrs["data-expired"] == "yes"
    assert [cell.text for cell in expired.find("td")][3] == "never"
    assert used.removeprefix(auth.TOKEN_PREFIX) not in client.get("/dashboard/tokens").text


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_every_page_opens_for_either_role_and_offers_no_action(app: Flask, role: str) -> None:
    """Viewers and operators read every page; none has a form but the
    logout one (and for an operator, the overview's pause or resume of each
    queue), a script, or an inline style (the CSP forbids them)."""
    client = signed_in(app, role)
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "style-src 'self'" in response.headers["Content-Security-Policy"]
        page = Page(response.get_data(as_text=True)).document
        forms = [form.attrs["action"] for form in page.find("form")]
        queues = [form for form in forms if form.startswith("/dashboard/queues/")]
        assert [form for form in forms if form not in queues] == ["/dashboard/logout"], path
        if role == "viewer" or path != "/dashboard/":
            assert not queues, path
        else:
            assert "/dashboard/queues/celery/pause" in queues
        assert not page.find("script"), path
        assert not [element.tag for element in page.walk() if "style" in element.attrs], path


def test_a_visitor_not_signed_in_is_sent_to_sign_in(app: Flask) -> None:
    client = app.test_client()
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 302, path
        target = urlsplit(response.headers["Location"])
        assert (target.path, parse_qs(target.query)) == ("/dashboard/login", {"next": [path]})
