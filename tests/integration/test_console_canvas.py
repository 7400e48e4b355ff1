"""The console's canvases on real databases: a step's page names its canvas,
parents and children, and draws the canvas, each step coloured by its state,
saying why a step waits or was cancelled; a big chord's column folds into a
"+k more" box; the jobs list filters by canvas, page after page; task names
are escaped wherever they are drawn.

Canvases are written by ``enqueue_on_commit``; their states move through a
real in-process worker, or through the ledger's own functions (claim,
succeed, release) where a test needs many steps in a given state.
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Mapping
from html.parser import HTMLParser

import pytest
from celery import Celery, chain, chord, group
from consoles import signed_in
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

import proj.jobs.testing
from proj.db import session_scope, worker_engine
from proj.jobs import Jobs, State, enqueue_on_commit, ledger, outbox, shared_task
from proj.jobs.models import Job
from proj.jobs.testing import InMemoryQueue

WORKER = "celery@console-canvas:4242"
LISTED = re.compile(r'<tr data-job-id="([^"]*)"')
OLDER = re.compile(r'<a href="([^"]+)" rel="next">')
SIZE = re.compile(r'<svg id="canvas-graph" class="canvas-graph" width="[\d.]+" height="([\d.]+)"')
BROKEN: set[str] = set()
"""Labels ``step`` fails for."""


@shared_task(name="tests.console_canvas.add", ignore_result=True)
def add(x: int, y: int) -> int:
    return x + y


@shared_task(name="tests.console_canvas.step", ignore_result=True, max_attempts=1)
def step(given: object, label: str) -> str:
    if label in BROKEN:
        raise RuntimeError(f"step {label} is broken")
    return label


@shared_task(name="tests.console_canvas.noted", ignore_result=True)
def noted(failed_id: str, label: str) -> str:
    return failed_id


@pytest.fixture
def viewer(app: Flask, memory: InMemoryQueue) -> FlaskClient:
    return signed_in(app, "viewer")


@pytest.fixture
def operator(app: Flask, memory: InMemoryQueue) -> FlaskClient:
    return signed_in(app, "operator")


class Drawing(HTMLParser):
    """A job page's canvas drawing: each box (``<a class="node …">``) with its
    attributes and texts, each edge's classes, the facts rows' links."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.nodes: list[dict[str, str]] = []
        self.edges: list[str] = []
        self.links: dict[str, list[str]] = {}
        self._node: dict[str, str] | None = None
        self._text: str | None = None
        self._row: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        given = {key: value or "" for key, value in attrs}
        if tag == "a" and given.get("class", "").startswith("node "):
            self._node = {**given, "label": "", "status": "", "title": ""}
            self.nodes.append(self._node)
        elif tag == "path" and "edge" in given.get("class", "").split():
            self.edges.append(given["class"])
        elif tag == "dd" and given.get("id", "").startswith("canvas-"):
            self._row = given["id"]
            self.links[self._row] = []
        elif tag == "a" and self._row is not None:
            self.links[self._row].append(given["href"])
        elif self._node is not None and tag in ("text", "title"):
            self._text = given.get("class") or tag

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._node is not None and self._text is None:
            self._node = None
        elif tag == "dd":
            self._row = None
        elif tag in ("text", "title"):
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._node is not None and self._text is not None:
            self._node[self._text] += data

    def node(self, job_id: str) -> dict[str, str]:
        [found] = [node for node in self.nodes if node["data-job-id"] == job_id]
        return found


def page(browser: FlaskClient, job_id: str) -> tuple[str, Drawing]:
    answer = browser.get(f"/dashboard/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return answer.text, Drawing(answer.text)


def steps(canvas_id: str) -> list[Job]:
    with session_scope() as session:
        found = list(session.scalars(select(Job).where(Job.canvas_id == canvas_id)))
        session.expunge_all()
    return found


def labelled(canvas_id: str) -> dict[str, Job]:
    """The canvas's steps by their last argument (each test gives each a label)."""
    return {str(job.args[-1]): job for job in steps(canvas_id)}


def succeed(job_id: str, result: object) -> None:
    """Run the job to success through the ledger, releasing the steps after it."""
    claim = ledger.claim(worker_engine(), job_id, WORKER)
    assert claim.claimed
    with session_scope() as session:
        ledger.succeed(session, job_id, claim.attempts, result)
        ledger.release(session, job_id, result, claim.graph or {})


def listed(browser: FlaskClient, query: Mapping[str, str]) -> list[str]:
    """Every job id the list shows for ``query``, page after page (each once)."""
    seen: list[str] = []
    answer = browser.get("/dashboard/jobs", query_string=dict(query))
    while True:
        assert answer.status_code == 200, answer.text
        seen += [html.unescape(job_id) for job_id in LISTED.findall(answer.text)]
        following = OLDER.search(answer.text)
        if following is None:
            break
        assert f"canvas={query['canvas']}" in html.unescape(following.group(1))
        answer = browser.get(html.unescape(following.group(1)))
    assert len(seen) == len(set(seen)), "a job was listed twice"
    return seen


def test_a_failed_member_colours_its_canvas_and_says_why_the_rest_was_cancelled(
    purged: Celery, app: Flask
) -> None:
    label = f"broken-{uuid.uuid4().hex[:8]}"
    BROKEN.add(label)
    header = [step.s(None, "a"), step.s(None, label).on_error(noted.s("errback"))]
    with session_scope() as session:
        canvas_id = enqueue_on_commit(
            chord(header, step.s("after") | step.s("last")), session=session
        )
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(
            lambda: all(
                job.state not in ("waiting", "queued", "running") for job in steps(canvas_id)
            ),
            timeout=60,
        )
    BROKEN.discard(label)
    jobs = labelled(canvas_id)
    failed, callback, last = jobs[label], jobs["after"], jobs["last"]
    browser = signed_in(app, "viewer")

    text, drawn = page(browser, failed.id)

    assert f'<a id="canvas-link" href="/dashboard/jobs?canvas={canvas_id}">' in text
    assert drawn.links["canvas-parents"] == []
    assert drawn.links["canvas-children"] == [f"/dashboard/jobs/{callback.id}"]
    assert drawn.links["canvas-errbacks"] == [f"/dashboard/jobs/{jobs['errback'].id}"]
    assert len(drawn.nodes) == 5
    for job in jobs.values():
        node = drawn.node(job.id)
        assert node["href"] == f"/dashboard/jobs/{job.id}"
        assert node["data-state"] == job.state
        assert job.state in node["class"].split()
    assert drawn.node(failed.id)["class"] == "node failed focus"
    assert drawn.node(jobs["a"].id)["class"] == "node succeeded"
    assert drawn.node(jobs["errback"].id)["class"] == "node succeeded errback"
    for cancelled in (callback, last):
        node = drawn.node(cancelled.id)
        assert node["status"] == "cancelled: step failed"
        assert failed.id in node["title"]
    assert drawn.node(failed.id)["label"] == "step"
    assert sorted(drawn.edges) == ["edge", "edge", "edge", "edge errback"]

    text, drawn = page(browser, callback.id)
    assert sorted(drawn.links["canvas-parents"]) == sorted(
        f"/dashboard/jobs/{job.id}" for job in (jobs["a"], failed)
    )
    assert drawn.links["canvas-children"] == [f"/dashboard/jobs/{last.id}"]
    assert "canvas-errbacks" not in drawn.links
    assert drawn.node(callback.id)["class"] == "node cancelled focus"


def test_a_big_chord_folds_into_a_more_box_and_its_callback_says_for_how_many_it_waits(
    celery_app: Celery, viewer: FlaskClient
) -> None:
    """A chord of 100, 90 of them succeeded: the callback waits for 10 of
    100; its column shows 7 members (the ones not done first) and "+93 more"."""
    members = [add.s(i, 0).set(task_id=f"member-{i:03}-{uuid.uuid4()}") for i in range(100)]
    with session_scope() as session:
        canvas_id = enqueue_on_commit(chord(members, add.s(1)), session=session)
    by_id = {job.id: job for job in steps(canvas_id)}
    member_ids = sorted(job_id for job_id in by_id if job_id.startswith("member-"))
    [callback_id] = set(by_id) - set(member_ids)
    for job_id in member_ids[:90]:
        succeed(job_id, 1)

    text, drawn = page(viewer, callback_id)

    callback = drawn.node(callback_id)
    assert callback["class"] == "node waiting focus"
    assert callback["status"] == "waiting for 10 of 100"
    members_drawn = [node for node in drawn.nodes if node["data-job-id"] in member_ids]
    assert len(members_drawn) == 7
    assert {node["data-state"] for node in members_drawn} == {"queued"}
    [more] = [node for node in drawn.nodes if "more" in node["class"].split()]
    assert (more["label"], more["status"]) == ("+93 more", "90 succeeded, 3 queued")
    assert more["href"] == f"/dashboard/jobs?canvas={canvas_id}"
    assert len(drawn.nodes) == 9
    assert drawn.edges.count("edge") == 8
    size = SIZE.search(text)
    assert size is not None and float(size.group(1)) < 400, "eight boxes high at most"
    assert "101 steps in 2 columns: 1 waiting, 10 queued, 90 succeeded." in text
    assert len(drawn.links["canvas-parents"]) == 20
    assert "and 80 more" in text

    _, drawn = page(viewer, member_ids[0])
    assert drawn.node(member_ids[0])["class"] == "node succeeded focus"
    assert drawn.links["canvas-children"] == [f"/dashboard/jobs/{callback_id}"]


def test_the_list_filters_by_canvas_and_its_pages_carry_the_filter(
    celery_app: Celery, operator: FlaskClient
) -> None:
    with session_scope() as session:
        big = enqueue_on_commit(group([add.s(i, i) for i in range(60)]), session=session)
        small = enqueue_on_commit(add.s(1, 1) | add.s(2), session=session)
        outbox.enqueue(
            session, Jobs.of(celery_app), add.name, [1, 2], {}, max_attempts=1, options={}
        )

    assert sorted(listed(operator, {"canvas": big})) == sorted(job.id for job in steps(big))
    [waiting] = [job.id for job in steps(small) if job.state == State.WAITING]
    assert listed(operator, {"canvas": small, "state": "waiting"}) == [waiting]
    assert listed(operator, {"canvas": str(uuid.uuid4())}) == []

    text = operator.get("/dashboard/jobs", query_string={"canvas": small}).text
    assert f'<input name="canvas" value="{small}"' in text
    assert text.count(f'<input type="hidden" name="canvas" value="{small}">') == 2
    too_long = operator.get("/dashboard/jobs", query_string={"canvas": "x" * 300})
    assert too_long.status_code == 400
    assert "canvas takes at most 255 characters" in too_long.text


def test_hostile_task_names_are_escaped_in_the_drawing_and_the_links(
    celery_app: Celery, viewer: FlaskClient
) -> None:
    first = celery_app.signature("tests.evil.<img src=x onerror=alert(1)>", args=("a",))
    second = celery_app.signature('tests.evil.</text><script>alert("2")</script>', args=("b",))
    with session_scope() as session:
        canvas_id = enqueue_on_commit(chain(first, second), session=session, celery_app=celery_app)
    jobs = labelled(canvas_id)

    for job in jobs.values():
        text, drawn = page(viewer, job.id)
        assert "<img" not in text and "<script>alert" not in text and "</text><script" not in text
        assert "&lt;img src=x onerror=alert(1" in text
        assert len(drawn.nodes) == 2
    _, drawn = page(viewer, jobs["b"].id)
    node = drawn.node(jobs["b"].id)
    assert node["label"] == '</text><script>alert("2")…'
    assert node["status"] == "waiting for <img src=x …"
    assert node["title"].startswith('tests.evil.</text><script>alert("2")</script>\n')
