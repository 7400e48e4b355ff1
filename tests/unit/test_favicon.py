"""The console's icon: linked from every console page, served as a static
file of the library's console, and at /favicon.ico on the reference web
application (browsers ask every site for it), so no page load logs a 404."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from proj.celery import make_celery
from proj.config import load_settings
from proj.db import db
from proj.jobs import Jobs, console
from proj.web import create_app

ICON = Path(console.blueprint.static_folder or "") / "favicon.svg"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Flask]:
    """The reference web application on the embedded setup (nothing is read
    from its database here)."""
    settings = load_settings({"PROJ_DATA_DIR": str(tmp_path)})
    celery_app = make_celery(settings)
    app = create_app(settings, celery_app)
    yield app
    with app.app_context():
        db.engine.dispose()
    Jobs.of(celery_app).dispose()


def test_the_icon_is_a_small_svg() -> None:
    assert ICON.read_text().startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert ICON.stat().st_size < 1024


def test_every_console_page_links_the_icon(web: Flask) -> None:
    """The base template every console page extends links the icon, and the
    link resolves to the console's static file."""
    page = web.test_client().get("/dashboard/login")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    link = '<link rel="icon" type="image/svg+xml" href="/dashboard/static/favicon.svg">'
    assert link in html
    with web.test_client().get("/dashboard/static/favicon.svg") as icon:
        assert icon.status_code == 200
        assert icon.mimetype == "image/svg+xml"
        assert icon.data == ICON.read_bytes()


def test_the_web_application_answers_favicon_ico(web: Flask) -> None:
    with web.test_client().get("/favicon.ico") as answer:
        assert answer.status_code == 200
        assert answer.mimetype == "image/svg+xml"
        assert answer.data == ICON.read_bytes()
