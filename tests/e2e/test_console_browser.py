"""The console in a real browser: Debian's Chromium, driven by Playwright
(pointed at ``/usr/bin/chromium``; nothing is downloaded), against the web
tier as docker-compose serves it (gunicorn) and a real worker, on PostgreSQL
and RabbitMQ.

Each page the test visits is saved as a screenshot in the test's temporary
folder (``screens/``), so a failure can be looked at; with
``PROJ_SCREENSHOTS`` set to a folder, they are copied there too (the
console pictures in ``docs/console/`` are made that way).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from e2e_tasks import needs_user, record_effect
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from subprocesses import Commands, free_port

from proj.jobs import Job, State, auth
from proj.jobs.testing import wait_for
from proj.models import User

if TYPE_CHECKING:
    from conftest import Stack

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = bool(os.environ.get("CI") or os.environ.get("PROJ_REQUIRE_SERVICES"))
PARKED = "parked"
"""A queue no worker consumes: its jobs wait until someone cancels them."""

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from Debian's packages."""
    if not CHROMIUM.exists():
        message = "browser tests need Debian's chromium (apt-get install chromium)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


class Screens:
    """Screenshots of the pages a test visits, numbered in the order taken."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir()
        self.taken: list[Path] = []

    def take(self, page: Any, name: str) -> None:
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)

    def publish(self) -> None:
        wanted = os.environ.get("PROJ_SCREENSHOTS")
        if wanted:
            Path(wanted).mkdir(parents=True, exist_ok=True)
            for path in self.taken:
                shutil.copy(path, Path(wanted) / re.sub(r"^\d+-", "", path.name))


@pytest.fixture
def screens(tmp_path: Path) -> Iterator[Screens]:
    made = Screens(tmp_path / "screens")
    yield made
    made.publish()


@pytest.fixture
def served(stack: Stack, commands: Commands, celery_app: Celery) -> Iterator[tuple[str, Stack]]:
    """gunicorn serving ``proj.web:create_app()`` (as docker-compose does) and a
    worker, on the stack; the console's URL. ``localhost``, where Chromium
    keeps ``Secure`` cookies over plain HTTP, as it would over HTTPS."""
    if stack.name != "pg-rabbit":
        pytest.skip("the browser tests run on PostgreSQL + RabbitMQ")
    port = free_port()
    env = stack.process_env()
    gunicorn = Path(sys.executable).parent / "gunicorn"
    web = commands.start(
        "gunicorn",
        str(gunicorn),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2", "proj.web:create_app()"),
        env=env,
    )
    web.wait_for_output("Booting worker")
    commands.worker(env)
    yield f"http://localhost:{port}/dashboard", stack


def make_account(stack: Stack, role: str) -> tuple[str, str]:
    email, password = f"{role}-{uuid.uuid4().hex[:8]}@example.com", uuid.uuid4().hex
    engine = create_engine(stack.settings.database_url)
    with Session(engine) as session:
        auth.add_account(session, email, password, role)
        session.commit()
    engine.dispose()
    return email, password


def sign_in(page: Any, base: str, email: str, password: str) -> None:
    page.goto(f"{base}/")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/dashboard/$"))


def ledger_rows(stack: Stack, ids: list[str]) -> dict[str, str]:
    engine = create_engine(stack.settings.database_url)
    with Session(engine) as session:
        found = dict(session.execute(select(Job.id, Job.state).where(Job.id.in_(ids))).all())
    engine.dispose()
    return found


def enqueue(stack: Stack) -> tuple[str, str, list[str]]:
    """A job that fails until its user exists (and that user's email), and
    three jobs parked on a queue no worker reads; their ids."""
    email = f"later-{uuid.uuid4().hex[:8]}@example.com"
    engine = create_engine(stack.settings.database_url)
    with Session(engine) as session:
        failing = needs_user.apply_async_on_commit((email,), session=session)
        parked = [
            record_effect.apply_async_on_commit(
                (f"parked-{uuid.uuid4().hex[:6]}", n), session=session, queue=PARKED
            )
            for n in range(3)
        ]
        session.commit()
    engine.dispose()
    return failing, email, parked


def add_user(stack: Stack, email: str) -> None:
    engine = create_engine(stack.settings.database_url)
    with Session(engine) as session:
        session.add(User(email=email))
        session.commit()
    engine.dispose()


def test_an_operator_finds_a_failure_retries_it_and_cancels_waiting_jobs(
    served: tuple[str, Stack], browser: Any, screens: Screens
) -> None:
    base, stack = served
    email, password = make_account(stack, "operator")
    failing, missing_email, parked = enqueue(stack)
    wait_for(lambda: ledger_rows(stack, [failing]).get(failing) == State.FAILED, timeout=60)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base}/")
    assert "/dashboard/login" in page.url
    screens.take(page, "login")
    sign_in(page, base, email, password)
    assert email in page.inner_text("header")
    screens.take(page, "overview")

    page.click("nav >> text=Jobs")
    page.select_option("select[name=state]", "failed")
    page.click("form.filters button[type=submit]")
    assert "state=failed" in page.url
    listed = page.locator("tr[data-job-id]")
    states = {listed.nth(i).locator(".state").inner_text() for i in range(listed.count())}
    assert states == {"failed"}
    assert page.locator(f"tr[data-job-id='{failing}']").count() == 1
    screens.take(page, "jobs-failed")

    page.click(f"tr[data-job-id='{failing}'] a")
    traceback = page.inner_text("main")
    assert "LookupError" in traceback and missing_email in traceback
    assert "Traceback (most recent call last)" in page.content()
    screens.take(page, "job-failed")

    add_user(stack, missing_email)  # what the failure needed: now a retry succeeds
    page.click("button:text-is('Retry')")
    assert "queued again" in page.inner_text("main")
    wait_for(lambda: ledger_rows(stack, [failing])[failing] == State.SUCCEEDED, timeout=60)
    page.reload()
    assert page.locator("span.state.succeeded").count() >= 1
    screens.take(page, "job-succeeded")

    page.goto(f"{base}/jobs?state=queued&queue={PARKED}")
    for job_id in parked:
        page.check(f"input[name=job_id][value='{job_id}']")
    page.click("button:text-is('Cancel ticked…')")
    assert page.locator("strong.count").get_attribute("data-count") == "3"
    screens.take(page, "confirm-cancel")
    page.click("button:text-is('Cancel 3 jobs')")
    assert "cancelled 3 jobs" in page.inner_text("main").lower()
    assert set(ledger_rows(stack, parked).values()) == {State.CANCELLED}
    screens.take(page, "jobs-cancelled")

    for name in ("periodic", "workers"):
        page.click(f"nav >> text={name.title()}")
        screens.take(page, name)
    assert "alive" in page.inner_text("main")

    page.click("button:text-is('Log out')")
    assert "/dashboard/login" in page.url
    page.goto(f"{base}/jobs")
    assert "/dashboard/login" in page.url
    page.close()


def test_a_viewer_sees_no_buttons_and_its_forged_posts_change_nothing(
    served: tuple[str, Stack], browser: Any, screens: Screens
) -> None:
    base, stack = served
    email, password = make_account(stack, "viewer")
    failing, _, parked = enqueue(stack)
    wait_for(lambda: ledger_rows(stack, [failing]).get(failing) == State.FAILED, timeout=60)
    before = ledger_rows(stack, [failing, *parked])

    page = browser.new_page()
    sign_in(page, base, email, password)
    page.goto(f"{base}/jobs/{failing}")
    assert page.locator("button:text-is('Retry')").count() == 0
    page.goto(f"{base}/jobs?queue={PARKED}")
    assert page.locator("input[name=job_id]").count() == 0
    assert page.locator("button:has-text('Cancel')").count() == 0
    screens.take(page, "viewer-jobs")

    # The viewer's own, valid CSRF token, on forged forms.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    forged = {
        f"{base}/jobs/{failing}/retry": {},
        f"{base}/jobs/{parked[0]}/cancel": {},
        f"{base}/jobs/act": {"action": "cancel", "scope": "matching", "queue": PARKED},
    }
    for url, form in forged.items():
        answer = page.request.post(url, form={**form, "csrf_token": token or ""})
        assert answer.status == 403, url
    assert ledger_rows(stack, [failing, *parked]) == before
    page.close()
