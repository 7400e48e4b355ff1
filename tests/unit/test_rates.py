"""Reading a shared rate: Celery's own forms, and a number of units."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proj.jobs import TaskArgumentError
from proj.jobs.rates import parse, rate_of, row_values


@pytest.mark.parametrize(
    ("rate", "read"),
    [
        ("60/m", (60, 60.0)),
        ("5/s", (5, 1.0)),
        ("1000/h", (1000, 3600.0)),
        ("10/5s", (10, 5.0)),
        (" 3 / 1.5m ", (3, 90.0)),
    ],
)
def test_rates_read(rate: str, read: tuple[int, float]) -> None:
    assert parse("t", rate) == read


@pytest.mark.parametrize("rate", ["60", "60/d", "0/m", "m/60", "10/0s", "", "1/-1s"])
def test_a_bad_rate_is_refused(rate: str) -> None:
    with pytest.raises(TaskArgumentError, match="t: a rate"):
        parse("t", rate)


def test_a_task_rate_keys_on_its_name_and_a_keyed_one_on_its_call() -> None:
    whole = SimpleNamespace(name="mail.send", rate="2/m")
    keyed = SimpleNamespace(name="pay.charge", rate=("provider:{provider}", "100/m"))
    assert row_values(whole, "mail.send", (1,), {}) == {
        "rate_key": "mail.send",
        "rate_limit": 2,
        "rate_period": 60.0,
    }
    assert row_values(keyed, "pay.charge", (), {"provider": "acme"})["rate_key"] == "provider:acme"
    with pytest.raises(TaskArgumentError, match=r"rate key .* names 'provider'"):
        row_values(keyed, "pay.charge", (1,), {})
    assert rate_of(SimpleNamespace(name="x")) is None
    with pytest.raises(TaskArgumentError, match="rate must be"):
        rate_of(SimpleNamespace(name="x", rate=("a", "1/m", 3)))
