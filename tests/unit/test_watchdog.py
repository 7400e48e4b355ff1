"""The threads pool's time limits, in one process: the watchdog's order and
cancelling, and a limit that interrupts Python code and only it."""

from __future__ import annotations

import threading
import time

import pytest
from billiard.exceptions import TimeLimitExceeded

from proj.jobs.time_limits import Watchdog, enforced


def test_the_watchdog_calls_what_is_due_in_order_and_nothing_cancelled() -> None:
    watchdog, called, done = Watchdog(), [], threading.Event()
    watchdog.watch(0.2, lambda: (called.append("late"), done.set()))
    dropped = watchdog.watch(0.05, lambda: called.append("dropped"))
    watchdog.watch(0.1, lambda: called.append("soon"))
    watchdog.cancel(dropped)
    assert done.wait(5)
    assert called == ["soon", "late"]


def test_cancelled_entries_do_not_pile_up() -> None:
    watchdog = Watchdog()
    for _ in range(1000):
        watchdog.cancel(watchdog.watch(3600, lambda: None))
    assert len(watchdog._due) < 200


def test_a_limit_interrupts_python_code_once_and_says_so_first() -> None:
    expired: list[float] = []
    started = time.monotonic()
    with (
        pytest.raises(TimeLimitExceeded),
        enforced(0.2, name="t", on_expiry=lambda: expired.append(1)),
    ):
        while time.monotonic() - started < 10:
            time.sleep(0.01)
    assert expired == [1]
    assert time.monotonic() - started < 2


def test_a_block_that_ends_in_time_is_left_alone() -> None:
    expired: list[int] = []
    with enforced(0.1, name="t", on_expiry=lambda: expired.append(1)):
        pass
    time.sleep(0.3)  # past the limit: nothing is raised here
    assert expired == []
