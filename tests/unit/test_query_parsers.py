"""The parsers of what browsers and clients send as text, under Hypothesis
(no services): the console's filters and bulk forms, its page cursors, the
sign-in's ``next``, and the whole numbers the job API and the console read.

For any text, each answers a value or its documented refusal, never another
error (which a request would turn into a 500); what it accepts comes back
unchanged through the links and forms built from it. The examples given are
inputs that broke them before.
"""

from __future__ import annotations

from datetime import UTC, timedelta, timezone
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from hypothesis import example, given
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict
from werkzeug.test import EnvironBuilder, create_environ
from werkzeug.utils import redirect

from proj.jobs.console.bulk import BATCH_LIMIT, Selection
from proj.jobs.console.filters import (
    FILTER_FIELDS,
    TEXT_LIMIT,
    InvalidFilter,
    JobFilter,
    is_job_id,
)
from proj.jobs.console.site import Refused, _local
from proj.jobs.http import whole_number
from proj.jobs.models import State

TRICKY = [
    "\x00", "\x7f", "\r\n", "\t", " ", "\u00a0", "\u2028", "\u3000", "²", "١", "٣", "𝟘",
    "0", "9", "+", "-", "_", ".", ":", "T", "Z", "%", "\\", "/", "//", "@", "?", "#",
]  # fmt: skip
"""Characters and pieces that parsers of numbers, times and URLs trip on."""


def texts(*pieces: str, max_size: int = 12) -> st.SearchStrategy[str]:
    """Any text a URL can carry (UTF-8, so no lone surrogate), often made of
    :data:`TRICKY` pieces and ``pieces``."""
    parts = st.sampled_from([*TRICKY, *pieces]) | st.characters(codec="utf-8")
    return st.text() | st.lists(parts, max_size=max_size).map("".join)


OFFSETS = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
)
MOMENTS = st.builds(
    lambda moment, timespec, sep: moment.isoformat(sep=sep, timespec=timespec),
    st.datetimes(timezones=st.none() | st.just(UTC) | OFFSETS.map(timezone)),
    st.sampled_from(["minutes", "seconds", "milliseconds", "microseconds"]),
    st.sampled_from(["T", " "]),
)
"""Times as ``datetime.isoformat`` writes them: naive, UTC or any offset, from year 1 to 9999."""
FILTER_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "state": st.sampled_from([str(state) for state in State]) | texts(),
        "name": texts("proj.tasks.send_welcome"),
        "queue": texts("celery"),
        "tenant": texts("acme"),
        "since": MOMENTS | texts("2025-01-31", "14:05"),
        "until": MOMENTS | texts("2025-01-31", "14:05"),
        "q": texts("5f0c2d8e-4b1a-4f7e-9a57-2f3b8c1d9e60"),
    },
)
"""Query arguments of the jobs list: values it takes, and any text."""


def through_a_link(args: dict[str, str]) -> MultiDict[str, str]:
    """``args`` as a request for a link made of them reads them back."""
    return EnvironBuilder(path="/dashboard/jobs", query_string=urlencode(args)).get_request().args


@given(FILTER_VALUES)
@example({"since": "0001-01-01T00:00+01:00"})  # before year 1 in UTC
@example({"until": "9999-12-31T23:59-01:00"})  # after year 9999 in UTC
@example({"name": "a\x00b"})  # PostgreSQL refuses a NUL in text
@example({"q": "\x00"})
@example({"tenant": "x" * (TEXT_LIMIT + 1)})
def test_a_filter_is_read_or_refused_and_its_links_give_it_back(values: dict[str, str]) -> None:
    try:
        chosen = JobFilter.read(values)
    except InvalidFilter as exc:
        assert exc.problems and set(exc.problems) <= set(FILTER_FIELDS), exc.problems
        return
    for text in (chosen.name, chosen.queue, chosen.tenant, chosen.q):
        assert text is None or is_job_id(text), "text the database refuses, or longer than a column"
    assert set(chosen.args()) <= set(FILTER_FIELDS)
    assert JobFilter.read(through_a_link(chosen.args())) == chosen


@given(
    st.fixed_dictionaries(
        {"action": st.sampled_from(["retry", "cancel"]) | texts()},
        optional={
            "scope": st.sampled_from(["selected", "matching"]) | texts(),
            "job_id": st.lists(texts(), max_size=4),
        },
    ),
    FILTER_VALUES,
)
@example({"action": "cancel", "scope": "selected", "job_id": ["\x00", "x" * 300]}, {})
def test_a_bulk_form_is_read_or_refused_with_a_400(
    form: dict[str, Any], values: dict[str, str]
) -> None:
    try:
        selection = Selection.read(MultiDict({**values, **form}))
    except Refused as exc:
        assert exc.status == 400, exc
        return
    assert all(is_job_id(job_id) for job_id in selection.job_ids)
    assert len(selection.job_ids) <= BATCH_LIMIT
    assert selection.scope == "selected" or not selection.job_ids


@given(texts(max_size=300) | st.text(min_size=TEXT_LIMIT, max_size=TEXT_LIMIT + 2))
@example("\x00")
def test_a_cursor_is_a_job_id_only_if_the_database_can_look_it_up(before: str) -> None:
    """What ``before`` may hold: an id no longer than the column, and no NUL
    (PostgreSQL refuses one in text); anything else is no job's."""
    assert is_job_id(before) == (len(before) <= TEXT_LIMIT and "\x00" not in before)


SITE = "https://proj.example/dashboard/login"


def where_a_browser_goes(location: str) -> str:
    """The host a browser on :data:`SITE` goes to for ``location``, read as
    the WHATWG URL standard reads it: C0 controls and spaces at the ends
    dropped, tabs and line breaks dropped anywhere, a backslash as a slash."""
    cleaned = location.strip("".join(map(chr, range(0x21))))
    cleaned = cleaned.replace("\t", "").replace("\n", "").replace("\r", "").replace("\\", "/")
    return urlsplit(urljoin(SITE, cleaned)).netloc


@given(texts("/", "evil.example", "https:", "javascript:") | texts().map("/".__add__))
@example("//evil.example/")
@example("https://evil.example/")
@example("javascript:alert(1)")
@example("/\\evil.example/")
@example("/\t/evil.example/")
@example("/dashboard/\r\nSet-Cookie: x=1")
@example("/dashboard/jobs?state=failed#top")
def test_sign_in_sends_nowhere_but_this_site(target: str) -> None:
    """``next`` is taken as it is, or not at all; what is taken makes a
    redirect (no header broken) to a page of this site."""
    taken = _local(target)
    assert taken in (None, target)
    if taken is None:
        return
    location = redirect(taken).get_wsgi_headers(create_environ(SITE))["Location"]
    assert "\r" not in location and "\n" not in location
    assert where_a_browser_goes(location) == urlsplit(SITE).netloc, location


@given(texts("1", "5", "0", max_size=8))
@example("²")  # a digit to str.isdigit(), which int() refuses
@example("1" * 5000)  # more digits than int() reads
@example(" 5")
@example("+5")
@example("5_0")
def test_a_whole_number_is_ascii_digits_or_none(text: str) -> None:
    number = whole_number(text)
    if number is None:
        assert not (text.isascii() and text.isdigit()) or len(text) > 4300
    else:
        assert text.isascii() and text.isdigit() and number == int(text) >= 0


@given(st.integers(min_value=0))
def test_a_whole_number_reads_back_what_str_writes(number: int) -> None:
    assert whole_number(str(number)) == number
