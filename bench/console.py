"""The console on a big ledger: ``python -m bench.console [--rows 1000000]``.

Fills a new PostgreSQL database's ledger with ``--rows`` jobs (a month of
them, every state, three queues, 1% failed), then asks the console's pages
as a signed-in operator would, through the Flask test client (no network),
and prints the median time of each page, beside the time of one plain
``SELECT count(*) FROM jobs`` on the same table as the baseline: a page
cheaper than counting the table holds up at that size.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial

from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from proj.celery import make_celery
from proj.config import load_settings
from proj.db import db
from proj.jobs import auth
from proj.migrations import upgrade
from proj.web import create_app
from tests import stacks

FILL = """
INSERT INTO jobs (id, name, args, kwargs, options, state, attempts, max_attempts,
                  created_at, available_at, published_at, started_at, finished_at)
SELECT md5(i::text), (ARRAY['proj.tasks.send_welcome', 'proj.tasks.charge_invoice',
                            'proj.tasks.generate_report'])[1 + i % 3],
       json_build_array(i), '{}',
       json_build_object('queue', (ARRAY['celery', 'long', 'mail'])[1 + i % 3]),
       CASE WHEN i % 100 = 0 THEN 'failed' WHEN i % 1000 = 1 THEN 'queued' ELSE 'succeeded' END,
       1, 3, now() - (i || ' seconds')::interval * 2.6, now() - (i || ' seconds')::interval * 2.6,
       now() - (i || ' seconds')::interval * 2.6, now() - (i || ' seconds')::interval * 2.6,
       CASE WHEN i % 1000 = 1 THEN NULL ELSE now() - (i || ' seconds')::interval * 2.6 END
FROM generate_series(1, :rows) AS i
"""
PAGES = {
    "overview": "/dashboard/",
    "jobs, newest": "/dashboard/jobs",
    "jobs, failed": "/dashboard/jobs?state=failed",
    "jobs, a queue": "/dashboard/jobs?queue=mail",
    "jobs, an id": "/dashboard/jobs?q={an_id}",
    "jobs, page 20": "{page_20}",
    "a job": "/dashboard/jobs/{an_id}",
    "jobs, text in the arguments": "/dashboard/jobs?q=424242",
}


def median_ms(call: Callable[[], object], times: int = 5) -> float:
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        call()
        spent.append((time.perf_counter() - began) * 1000)
    return statistics.median(spent)


def page_20(client: FlaskClient) -> str:
    url = "/dashboard/jobs"
    for _ in range(19):
        found = re.search(r'href="([^"]+)" rel="next"', client.get(url).text)
        assert found, "fewer than 20 pages"
        url = found.group(1).replace("&amp;", "&")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    with stacks.postgres_database() as url:
        env = {"DATABASE_URL": url, "SECRET_KEY": uuid.uuid4().hex * 2}
        settings = load_settings(env)
        upgrade(url)
        engine = create_engine(settings.database_url)
        with engine.begin() as connection:
            began = time.perf_counter()
            connection.execute(text(FILL), {"rows": rows})
            connection.exec_driver_sql("ANALYZE jobs")
        print(f"ledger: {rows:,} jobs written in {time.perf_counter() - began:.1f} s")
        with engine.connect() as connection:
            baseline = median_ms(lambda: connection.exec_driver_sql("SELECT count(*) FROM jobs"))
            an_id = connection.exec_driver_sql("SELECT md5('4242')").scalar()
        app = create_app(settings, make_celery(settings))
        with app.app_context():
            auth.add_account(db.session(), "bench@example.com", "bench-password", "operator")
            db.session.commit()
        client = app.test_client()
        form = client.get("/dashboard/login").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert token
        client.post(
            "/dashboard/login",
            data={
                "email": "bench@example.com",
                "password": "bench-password",
                "csrf_token": token[1],
            },
        )
        urls = {name: u.format(an_id=an_id, page_20=page_20(client)) for name, u in PAGES.items()}
        print(f"baseline: SELECT count(*) FROM jobs: {baseline:.1f} ms\n")
        print("| page | median ms | × count(*) |\n|---|---|---|")
        for name, page in urls.items():
            answer = client.get(page)
            assert answer.status_code == 200, (page, answer.status_code)
            spent = median_ms(partial(client.get, page))
            print(f"| {name} | {spent:.1f} | {spent / baseline:.2f} |")
        with app.app_context():
            db.engine.dispose()
        engine.dispose()


if __name__ == "__main__":
    main()
