"""Celery's own canvas over tasks that ignore their results, on the
database result backend every stack uses: a chord is refused before
anything is sent (``chord_unlock`` would poll forever), and a group's
``.get()`` at once (it would wait forever); the same over tasks that keep
their results is left to Celery."""

from __future__ import annotations

import pytest
from celery import Celery, chord, group, shared_task
from celery.exceptions import TimeoutError as CeleryTimeout

from proj.jobs import TaskArgumentError


@shared_task(name="tests.plain_canvas.forget", ignore_result=True)
def forget(n: int) -> int:
    return n


@shared_task(name="tests.plain_canvas.keep", ignore_result=False)
def keep(n: int) -> int:
    return n


@shared_task(name="tests.plain_canvas.total", ignore_result=False)
def total(numbers: list[int]) -> int:
    return sum(numbers)


def test_a_chord_over_tasks_that_ignore_results_is_refused_before_anything_is_sent(
    purged: Celery,
) -> None:
    assert not purged.backend.supports_native_join
    with pytest.raises(
        TaskArgumentError, match=r"tests.plain_canvas.forget: .* a chord would wait"
    ):
        chord([keep.s(1), forget.s(2)])(total.s())
    with pytest.raises(TaskArgumentError, match="enqueue_on_commit"):
        chord(group(group(forget.s(1), keep.s(2)), keep.s(3)))(total.s())
    assert purged.control.purge() == 0, "nothing was sent"
    chord([keep.s(1), keep.s(2)])(total.s())  # results kept: Celery's to run
    assert purged.control.purge() > 0


def test_a_groups_get_over_tasks_that_ignore_results_is_refused_at_once(purged: Celery) -> None:
    sent = group(forget.s(1), keep.s(2)).apply_async()
    with pytest.raises(TaskArgumentError, match=r"tests.plain_canvas.forget: .* .get\(\) would"):
        sent.get(timeout=30)
    kept = group(keep.s(1), keep.s(2)).apply_async()
    with pytest.raises(CeleryTimeout):  # no worker: Celery's own wait, cut short
        kept.get(timeout=0.5)
