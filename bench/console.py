"""The console and the job API on a big ledger: ``python -m bench.console [--rows 10000000]``.

Makes a database as a deployment has it (an owner role that migrates, an
application role under row-level security, see ``tests/stacks.py``), fills
its ledger with ``--rows`` jobs through ``COPY`` (a month of them: a dozen
tasks from common to rare, four queues, hundreds of tenants, the states a
ledger holds, arguments with ids and email addresses) at the revision before
the newest, times ``proj jobs upgrade`` to the newest while another
connection enqueues as fast as it can (printing every enqueue over ``SLOW``
ms), then asks the console's pages as a signed-in operator and the job
API's listings as a token would, through the Flask test client (no
network), as the application's role. It prints each page's median and p95
beside one plain ``SELECT count(*) FROM jobs`` as the baseline, and the
relay's and the reconciler's statements on this ledger beside the same on
an empty one.
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial

import psycopg2
from alembic import command
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from proj.celery import make_celery
from proj.config import load_settings
from proj.db import db
from proj.jobs import Jobs, auth, context, reconciler, utcnow
from proj.jobs.engine import resolve_url
from proj.jobs.migrations import alembic_config
from proj.jobs.relay import make_relay
from proj.migrations import upgrade
from proj.web import create_app
from tests import stacks

TASKS = {
    "proj.tasks.send_welcome": 30,
    "proj.tasks.charge_invoice": 25,
    "proj.tasks.generate_report": 15,
    "proj.tasks.send_digest": 10,
    "bench.sync_crm": 8,
    "bench.resize_image": 6,
    "bench.export_csv": 3,
    "bench.reindex": 2,
    "bench.rotate_keys": 0.9,
    "bench.purge_cache": 0.09,
    "bench.close_year": 0.01,
}
QUEUES = {"celery": 70, "mail": 20, "long": 9.9, "reports": 0.1}
TENANTS = [None, *(f"tenant-{n}" for n in range(500))]
TENANT_WEIGHTS = [100, *(200 / (n + 1) for n in range(500))]
FINAL = {"succeeded": 97, "failed": 2, "cancelled": 1}
OPEN = {"queued": 50, "running": 10, "retrying": 20, "waiting": 20}
OPEN_SHARE = 0.002
"""The newest rows still open (waiting, queued, running, retrying)."""
SPAN = timedelta(days=30)
COLUMNS = (
    "id, name, args, kwargs, options, state, attempts, max_attempts, created_at, "
    "available_at, published_at, started_at, finished_at, worker, error, tenant, queue"
)
CHUNK = 100_000
ENQUEUE = """
INSERT INTO jobs (id, name, args, kwargs, options, state, attempts, max_attempts,
                  created_at, available_at, published_at, queue)
VALUES (%(id)s, 'proj.tasks.send_welcome', '[1]', '{}', '{}', 'queued', 0, 3,
        now(), now(), now(), 'celery')
"""
SLOW = 250
"""Milliseconds over which an enqueue during the upgrade is reported."""
BEFORE = "jobs_0014"
"""The ledger's revision the jobs are written at: the upgrade to head is measured."""
NULL = "\\N"

PAGES = {
    "overview": "/dashboard/",
    "jobs, newest": "/dashboard/jobs",
    "jobs, page 20": "{page_20}",
    "jobs, failed": "/dashboard/jobs?state=failed",
    "jobs, a queue": "/dashboard/jobs?queue=mail",
    "jobs, a rare queue": "/dashboard/jobs?queue=reports",
    "jobs, a rare task": "/dashboard/jobs?name=bench.close_year",
    "jobs, a tenant": "/dashboard/jobs?tenant=tenant-40",
    "jobs, a tenant's failed": "/dashboard/jobs?tenant=tenant-40&state=failed",
    "jobs, a day two weeks ago": "/dashboard/jobs?since={day}T00:00&until={day}T23:59",
    "jobs, an id": "/dashboard/jobs?q={an_id}",
    "jobs, rare text in the arguments": "/dashboard/jobs?q=user4242424@",
    "jobs, common text in the arguments": "/dashboard/jobs?q=example.com",
    "jobs, text in no arguments": "/dashboard/jobs?q=no-such-text",
    "a job": "/dashboard/jobs/{an_id}",
    "API: jobs": "/api/jobs",
    "API: jobs, failed": "/api/jobs?state=failed",
    "API: jobs, 100 a page": "/api/jobs?limit=100",
    "API: jobs, the next page": "{api_next}",
}
TENANT_API = "/api/jobs"
"""Listed with a tenant's token as well: that tenant's jobs only."""
TIMES = 20


def rows(count: int, now: datetime) -> Iterator[str]:
    """``count`` ledger rows, oldest first, as ``COPY``'s text format lines."""
    pick = random.Random(42)
    names, name_weights = list(TASKS), list(TASKS.values())
    queues, queue_weights = list(QUEUES), list(QUEUES.values())
    first = now - SPAN
    step = SPAN / count
    open_from = int(count * (1 - OPEN_SHARE))
    for start in range(0, count, CHUNK):
        size = min(CHUNK, count - start)
        chosen = zip(
            pick.choices(names, name_weights, k=size),
            pick.choices(queues, queue_weights, k=size),
            pick.choices(TENANTS, TENANT_WEIGHTS, k=size),
            pick.choices(list(FINAL), list(FINAL.values()), k=size),
            pick.choices(list(OPEN), list(OPEN.values()), k=size),
            strict=True,
        )
        lines = []
        for n, (name, queue, tenant, final, still_open) in enumerate(chosen, start):
            user = pick.randrange(10_000_000)
            created = first + step * n
            state = still_open if n >= open_from else final
            failed = state == "failed"
            finished = (created + timedelta(seconds=2.5)).isoformat() if n < open_from else NULL
            started = created.isoformat() if state not in ("queued", "waiting") else NULL
            lines.append(
                "\t".join(
                    (
                        f"{pick.getrandbits(128):032x}",
                        name,
                        f"[{user}]",
                        f'{{"email": "user{user}@example.com", "invoice": {n}}}',
                        f'{{"queue": "{queue}"}}',
                        state,
                        "3" if failed else "1",
                        "3",
                        created.isoformat(),
                        created.isoformat(),
                        created.isoformat() if state != "waiting" else NULL,
                        started,
                        finished,
                        "celery@bench:4242" if started != NULL else NULL,
                        "TimeoutError: the upstream took too long" if failed else NULL,
                        tenant or NULL,
                        queue,
                    )
                )
            )
        yield "\n".join(lines) + "\n"


class Lines(io.TextIOBase):
    """``rows``' text as a file ``COPY FROM STDIN`` reads."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self.chunks = chunks
        self.left = ""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        while size is None or size < 0 or len(self.left) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.left += chunk
        wanted = len(self.left) if size is None or size < 0 else size
        given, self.left = self.left[:wanted], self.left[wanted:]
        return given


def fill(superuser_url: str, count: int) -> float:
    """Writes ``count`` jobs (as the superuser: ``COPY FROM`` is refused to a
    role that row-level security applies to); the seconds it took."""
    began = time.perf_counter()
    connection = psycopg2.connect(superuser_url)
    with connection, connection.cursor() as cursor:
        copy = f"COPY jobs ({COLUMNS}) FROM STDIN"
        cursor.copy_expert(copy, Lines(rows(count, datetime.now(UTC))), size=1 << 20)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE jobs")
    connection.close()
    return time.perf_counter() - began


def upgrade_while_enqueueing(url: str, owner_url: str) -> tuple[float, list[str], int]:
    """``proj jobs upgrade`` (as the owner) of a ledger at ``jobs_0014`` while
    the application's role enqueues (one ``INSERT`` a transaction, as
    ``delay_on_commit`` writes its row) as fast as it can: the upgrade's
    seconds, the enqueues slower than ``SLOW`` ms (when in the upgrade, and
    how long), and how many were made."""
    stop = threading.Event()
    spent: list[tuple[float, float]] = []

    def enqueue() -> None:
        connection = psycopg2.connect(url)
        with connection.cursor() as cursor:
            while not stop.is_set():
                began = time.perf_counter()
                cursor.execute(ENQUEUE, {"id": uuid.uuid4().hex})
                connection.commit()
                spent.append((began, time.perf_counter() - began))
        connection.close()

    thread = threading.Thread(target=enqueue)
    thread.start()
    time.sleep(1)
    began = time.perf_counter()
    upgrade(owner_url)
    took = time.perf_counter() - began
    time.sleep(1)
    stop.set()
    thread.join()
    slow = [
        f"{1000 * seconds:.0f} ms at {at - began:.0f} s"
        for at, seconds in spent
        if seconds * 1000 > SLOW
    ]
    return took, slow, len(spent)


def spent_ms(call: Callable[[], object], times: int = TIMES) -> list[float]:
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        call()
        spent.append((time.perf_counter() - began) * 1000)
    return spent


@contextmanager
def full_collections() -> Iterator[list[float]]:
    """The milliseconds of each of Python's collections of its oldest
    generation meanwhile: one pauses this process for about 100 ms on this
    ledger's bench, and is the one slow answer in twenty a page may show."""
    paused: list[float] = []
    began: list[float] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            began[:] = [time.perf_counter()]
        else:
            paused.append((time.perf_counter() - began[0]) * 1000)

    gc.callbacks.append(timed)
    try:
        yield paused
    finally:
        gc.callbacks.remove(timed)


def p95(spent: list[float]) -> float:
    return statistics.quantiles(spent, n=20)[-1]


def page_20(client: FlaskClient) -> str:
    url = "/dashboard/jobs"
    for _ in range(19):
        found = re.search(r'href="([^"]+)" rel="next"', client.get(url).text)
        assert found, "fewer than 20 pages"
        url = found.group(1).replace("&amp;", "&")
    return url


def signed_in(client: FlaskClient) -> None:
    form = client.get("/dashboard/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token
    client.post(
        "/dashboard/login",
        data={"email": "bench@example.com", "password": "bench-password", "csrf_token": token[1]},
    )


def ledger_statements(env: dict[str, str]) -> dict[str, list[float]]:
    """The relay's turn and the reconciler's pass on the ledger of ``env``,
    nothing owed and nothing lost: each queue holds a message, as it does
    while a backlog waits, and the lost jobs are looked for as deployed
    (``PROJ_STALE_AFTER``'s default). Running jobs are looked for among
    those started a century ago: the bench's have no live worker, and
    asking the broker which run takes its one-second broadcast."""
    settings = load_settings(env)
    celery_app = make_celery(settings)
    relay = make_relay(celery_app)
    jobs = Jobs.of(celery_app)
    with celery_app.connection_for_write() as connection:
        for queue in QUEUES:
            connection.SimpleQueue(queue).put({"held": True})

    def reconcile() -> None:
        with jobs.session_scope() as session:
            context.scope_system(session.connection())
            now = utcnow()
            stale = now - timedelta(seconds=jobs.settings.stale_after)
            reconciler.resend_lost(session, celery_app, stale)
            reconciler.take_back_abandoned(session, celery_app, now - timedelta(days=36_500))

    found = {
        "relay: one turn": spent_ms(relay.relay_once),
        "reconciler: one pass": spent_ms(reconcile),
        "reconciler: the broker asked about the four queues": spent_ms(
            partial(reconciler.empty_queues, celery_app, QUEUES)
        ),
    }
    jobs.dispose()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    count = parser.parse_args().rows
    with stacks.role_database() as (url, owner_url), stacks.redis_database() as broker:
        base = {"SECRET_KEY": uuid.uuid4().hex * 2, "CELERY_BROKER_URL": broker}
        env = {**base, "DATABASE_URL": url}
        upgrade(owner_url)
        empty = ledger_statements(env)
        engine = create_engine(resolve_url(owner_url))
        with engine.connect() as connection:
            command.downgrade(alembic_config(connection=connection), BEFORE)
        engine.dispose()
        superuser_url = make_url(url).set(username=stacks.POSTGRES[2]).render_as_string()
        print(f"ledger: {count:,} jobs written and vacuumed in {fill(superuser_url, count):.0f} s")
        took, slow, made = upgrade_while_enqueueing(url, owner_url)
        print(
            f"upgrade from {BEFORE} to head: {took:.0f} s while {made:,} jobs were enqueued; "
            f"enqueues over {SLOW} ms: {', '.join(slow) or 'none'}"
        )
        full = ledger_statements(env)
        engine = create_engine(load_settings(env).database_url)
        with engine.connect() as connection:
            baseline = spent_ms(lambda: connection.exec_driver_sql("SELECT count(*) FROM jobs"), 5)
            size = connection.exec_driver_sql(
                "SELECT pg_size_pretty(pg_total_relation_size('jobs'))"
            ).scalar()
        engine.dispose()
        settings = load_settings(env)
        app = create_app(settings, make_celery(settings))
        with app.app_context():
            session = db.session()
            auth.add_account(session, "bench@example.com", "bench-password", "operator")
            token = auth.add_token(session, "bench", "viewer")
            tenant_token = auth.add_token(session, "bench-tenant", "viewer", tenant="tenant-40")
            context.scope_system(session.connection())  # any tenant's job
            an_id = session.execute(
                text(
                    "SELECT id FROM jobs WHERE state = 'succeeded' AND created_at < :middle "
                    "ORDER BY created_at DESC LIMIT 1"
                ),
                {"middle": datetime.now(UTC) - SPAN / 2},
            ).scalar()
            session.commit()
        client = app.test_client()
        signed_in(client)
        bearer = {"Authorization": f"Bearer {token}"}
        api_next = client.get("/api/jobs", headers=bearer).json["next"]  # type: ignore[index]
        day = (datetime.now(UTC) - timedelta(days=14)).date().isoformat()
        urls = {
            name: page.format(an_id=an_id, page_20=page_20(client), day=day, api_next=api_next)
            for name, page in PAGES.items()
        }
        print(
            f"ledger size: {size}; baseline: SELECT count(*) FROM jobs: "
            f"median {statistics.median(baseline):.0f} ms\n"
        )
        print("| page | median ms | p95 ms | Python's full collections, ms |\n|---|---|---|---|")
        asks = {name: partial(client.get, page, headers=bearer) for name, page in urls.items()}
        tenant_bearer = {"Authorization": f"Bearer {tenant_token}"}
        asks["API: jobs, a tenant's token"] = partial(client.get, TENANT_API, headers=tenant_bearer)
        for name, ask in asks.items():
            answer = ask()
            if answer.status_code != 200:
                print(f"| {name} | answered {answer.status_code} | | |")
                continue
            with full_collections() as paused:
                spent = spent_ms(ask)
            pauses = ", ".join(f"{ms:.0f}" for ms in paused) or "none"
            print(f"| {name} | {statistics.median(spent):.1f} | {p95(spent):.1f} | {pauses} |")
        print("\n| statement | empty ledger, median ms | this ledger, median ms | p95 ms |")
        print("|---|---|---|---|")
        for name, spent in full.items():
            print(
                f"| {name} | {statistics.median(empty[name]):.1f} | "
                f"{statistics.median(spent):.1f} | {p95(spent):.1f} |"
            )
        with app.app_context():
            db.engine.dispose()


if __name__ == "__main__":
    main()
