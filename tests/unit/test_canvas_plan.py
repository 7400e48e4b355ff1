"""How a Celery canvas is laid out as ledger steps (:func:`proj.jobs.canvas.plan`):
who waits for whom, who gathers results, who is an error callback."""

from __future__ import annotations

import pytest
from celery import Celery, chain, chord, group

from proj.jobs import TaskArgumentError
from proj.jobs.canvas import Plan, Step, plan, starting

app = Celery("canvas-plan", set_as_current=False)


@app.task(name="unit.a")
def a(*args: object) -> None: ...


@app.task(name="unit.b")
def b(*args: object) -> None: ...


def laid_out(canvas: object) -> tuple[Plan, list[Step]]:
    found = plan(canvas, app)
    return found, list(found.steps.values())


def test_a_chain_waits_step_by_step() -> None:
    _, (first, second, third) = laid_out(a.s(1) | b.s() | a.s())
    assert (first.parents, second.parents, third.parents) == ([], [first.id], [second.id])
    assert (first.children, second.children, third.children) == ([second.id], [third.id], [])
    assert not any(step.gather for step in (first, second, third))
    assert [step.id for step in starting([first, second, third])] == [first.id]


def test_a_chord_callback_gathers_its_members_in_order() -> None:
    _, steps = laid_out(chord([a.s(1), a.s(2) | b.s(), a.s(3)], b.s(9)))
    one, two, two_after, three, callback = steps
    assert callback.parents == [one.id, two_after.id, three.id]
    assert callback.gather and callback.args == [9]
    assert two_after.parents == [two.id] and not two_after.gather


def test_a_group_inside_a_chain_is_a_chord_and_its_members_share_a_parent() -> None:
    _, (first, left, right, last) = laid_out(chain(a.s(1), group(a.s(), b.s()), a.s()))
    assert left.parents == right.parents == [first.id]
    assert last.parents == [left.id, right.id] and last.gather


def test_an_empty_chord_header_gives_the_callback_an_empty_list() -> None:
    _, (callback,) = laid_out(chord([], b.s(7)))
    assert (callback.parents, callback.args) == ([], [[], 7])


def test_link_error_is_a_callback_of_every_step_it_covers() -> None:
    _, steps = laid_out((a.s(1) | b.s()).on_error(a.si("oops")))
    first, first_errback, second, second_errback = steps
    assert first.errbacks == [first_errback.id] and second.errbacks == [second_errback.id]
    assert first_errback.errback and first_errback.immutable and first_errback.parents == [first.id]
    assert first.children == [second.id]  # an errback is not a child


def test_link_runs_after_its_step_with_its_result() -> None:
    _, (first, linked) = laid_out(a.s(1).set(link=b.s(2)))
    assert linked.parents == [first.id] and linked.args == [2] and not linked.immutable


def test_immutable_signatures_take_no_result() -> None:
    _, (_, second) = laid_out(a.s(1) | b.si(2))
    assert second.immutable


def test_options_a_waiting_step_cannot_take_are_refused() -> None:
    with pytest.raises(TaskArgumentError, match="eta cannot go on a step"):
        plan(a.s(1) | b.s().set(eta="2030-01-01T00:00:00+00:00"), app)
    first = plan(a.s(1).set(countdown=30) | b.s(), app).steps
    assert next(iter(first.values())).options["countdown"] == 30


def test_a_task_id_used_twice_is_refused() -> None:
    with pytest.raises(TaskArgumentError, match="in the canvas twice"):
        plan(a.s(1).set(task_id="same") | b.s().set(task_id="same"), app)
