"""A canvas (chain, group, chord) as a graph for a job's page: the geometry
of each step's box and each edge, in SVG user units, for a template to draw
as inline SVG, as :mod:`~proj.jobs.console.charts` does (colours come from
the stylesheet's state classes; text is escaped by the template).

Steps are laid out in columns, left to right: a step's column is the
longest path to it from a step that starts the canvas, so each step stands
right of every job it waits for. A ``link_error`` callback stands under the
job it is the callback of, in its column, joined by a dashed edge.

The drawing stays small whatever the canvas: a column shows at most
:data:`SHOWN_PER_COLUMN` steps (the job itself, its parents, children and
error callbacks first, then failed, running… before succeeded ones); the
rest of the column is one "+k more" box, counting them by state, which
links to the canvas's jobs list. At most :data:`MAX_COLUMNS` columns are
drawn, around the job's own; a canvas of more than :data:`MAX_STEPS` steps
is not drawn at all (its list is).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from proj.jobs.ledger import AFTER_ENDED
from proj.jobs.models import Job, State

MAX_STEPS = 2_000
"""Steps read to draw a canvas; a larger canvas is not drawn."""
SHOWN_PER_COLUMN = 8
"""Boxes in one column, its "+k more" box included."""
MAX_COLUMNS = 12
"""Columns drawn, around the job's own."""
RELATIVES_SHOWN = 20
"""Parents, children or error callbacks named on a job's page, each."""
NODE_WIDTH, NODE_HEIGHT, COLUMN_GAP, ROW_GAP, MARGIN, INDENT = 170.0, 38.0, 44.0, 10.0, 12.0, 14.0
LABEL_CHARS, STATUS_CHARS = 26, 28
"""Characters of a task's name, and of its status, in its box (the tooltip has all)."""
INTEREST = (
    State.FAILED,
    State.RUNNING,
    State.RETRYING,
    State.CANCELLED,
    State.QUEUED,
    State.WAITING,
    State.SUCCEEDED,
)
"""Which steps a full column keeps first, after the job and its relatives."""


@dataclass(frozen=True)
class Step:
    """A canvas step as its row has it."""

    id: str
    name: str
    state: str
    parents_left: int
    error: str | None
    graph: Mapping[str, Any]

    @property
    def parents(self) -> list[str]:
        return list(self.graph.get("parents") or ())

    @property
    def errback(self) -> bool:
        return bool(self.graph.get("errback"))


@dataclass(frozen=True)
class Node:
    """A step's box, or a column's "+k more" box (``job_id`` None)."""

    x: float
    y: float
    width: float
    height: float
    key: str
    """A state (the stylesheet colours it), or ``more``."""
    job_id: str | None
    label: str
    """The task's short name, shortened to fit."""
    status: str
    """Its state, and why it waits or was cancelled."""
    title: str
    """The box in words (its tooltip)."""
    focus: bool = False
    """The job whose page this is."""
    errback: bool = False


@dataclass(frozen=True)
class Edge:
    """A line from a job to a step after it (``errback``: to its error callback)."""

    path: str
    """The SVG path's ``d``."""
    errback: bool


@dataclass(frozen=True)
class CanvasGraph:
    """A canvas drawn around one of its jobs."""

    width: float
    height: float
    nodes: Sequence[Node]
    edges: Sequence[Edge]
    steps: int
    """Steps in the canvas."""
    summary: str
    """The drawing in words (its ``<desc>`` and caption)."""


@dataclass(frozen=True)
class Relative:
    """A job named on another's page."""

    id: str
    name: str
    state: str


@dataclass(frozen=True)
class Relatives:
    """A step's parents, children and error callbacks: the first
    :data:`RELATIVES_SHOWN` of each."""

    parents: list[Relative]
    children: list[Relative]
    errbacks: list[Relative]
    unnamed: dict[str, int]
    """How many of each (``parents``, ``children``, ``errbacks``) are not named."""


def relatives(session: Session, job: Job) -> Relatives:
    """``job``'s parents, children and error callbacks, in the canvas's order."""
    graph = job.graph or {}
    wanted = {key: list(graph.get(key) or ()) for key in ("parents", "children", "errbacks")}
    ids = {job_id for found in wanted.values() for job_id in found[:RELATIVES_SHOWN]}
    rows = session.execute(select(Job.id, Job.name, Job.state).where(Job.id.in_(ids))).all()
    known = {row.id: Relative(row.id, row.name, str(row.state)) for row in rows}
    named = {
        key: [known[i] for i in found[:RELATIVES_SHOWN] if i in known]
        for key, found in wanted.items()
    }
    unnamed = {key: len(found) - len(named[key]) for key, found in wanted.items()}
    return Relatives(named["parents"], named["children"], named["errbacks"], unnamed)


def draw(session: Session, job: Job) -> CanvasGraph | None:
    """``job``'s canvas drawn around it; None if it is in none, or in one of
    more than :data:`MAX_STEPS` steps."""
    if job.canvas_id is None:
        return None
    query = (
        select(Job.id, Job.name, Job.state, Job.parents_left, Job.error, Job.graph)
        .where(Job.canvas_id == job.canvas_id)
        .order_by(Job.created_at, Job.id)
        .limit(MAX_STEPS + 1)
    )
    rows = session.execute(query).all()
    if len(rows) > MAX_STEPS:
        return None
    steps = [
        Step(r.id, r.name, str(r.state), r.parents_left or 0, r.error, r.graph or {}) for r in rows
    ]
    return layout(steps, job.id)


def layout(steps: Sequence[Step], focus: str) -> CanvasGraph:
    """``steps`` (a whole canvas) in columns around the step ``focus``."""
    by_id = {step.id: step for step in steps}
    order = _ordered(by_id)
    columns = _columns(by_id, order)
    count = max(columns.values(), default=0) + 1
    around = columns.get(focus, 0)
    first = min(max(around - MAX_COLUMNS // 2, 0), max(count - MAX_COLUMNS, 0))
    drawn = range(first, min(first + MAX_COLUMNS, count))
    # Each drawn step's column and row (a hidden one's: its column's "+k more").
    placed: dict[str, tuple[int, int]] = {}
    shown: list[list[Step | list[Step]]] = []
    for number in drawn:
        kept, hidden = _fit([by_id[i] for i in order if columns[i] == number], by_id.get(focus))
        for row, step in enumerate(kept):
            placed[step.id] = (number - first, row)
        for step in hidden:
            placed[step.id] = (number - first, len(kept))
        shown.append([*kept, hidden] if hidden else list(kept))
    tallest = max((len(column) for column in shown), default=1)
    boxes: dict[tuple[int, int], Node] = {}
    for c, column in enumerate(shown):
        top = MARGIN + (tallest - len(column)) * (NODE_HEIGHT + ROW_GAP) / 2
        for r, item in enumerate(column):
            x = MARGIN + c * (NODE_WIDTH + COLUMN_GAP)
            y = top + r * (NODE_HEIGHT + ROW_GAP)
            boxes[c, r] = (
                _more(x, y, item) if isinstance(item, list) else _box(x, y, item, by_id, focus)
            )
    width = MARGIN * 2 + len(shown) * NODE_WIDTH + max(len(shown) - 1, 0) * COLUMN_GAP
    height = MARGIN * 2 + tallest * NODE_HEIGHT + (tallest - 1) * ROW_GAP
    return CanvasGraph(
        width,
        height,
        list(boxes.values()),
        _edges(steps, placed, boxes),
        len(steps),
        _summary(steps, drawn, count),
    )


def _columns(by_id: Mapping[str, Step], order: Sequence[str]) -> dict[str, int]:
    """Each step's column (``order`` has every step after its parents): the
    longest path to it from a step with no parent (an error callback stands
    in its job's column)."""
    columns: dict[str, int] = {}
    for step_id in order:
        step = by_id[step_id]
        gap = 0 if step.errback else 1
        columns[step_id] = max((columns[p] + gap for p in step.parents if p in columns), default=0)
    return columns


def _ordered(by_id: Mapping[str, Step]) -> list[str]:
    """Every step after its parents, and siblings in the order the canvas
    placed them (a step's parents are listed in the group's order): the
    steps each last step waits for, depth first."""
    order: list[str] = []
    seen: set[str] = set()
    children = {p for step in by_id.values() for p in step.parents}
    last = sorted(step_id for step_id in by_id if step_id not in children)
    for start in last:
        stack: list[tuple[str, bool]] = [(start, False)]
        while stack:
            step_id, expanded = stack.pop()
            if expanded:
                order.append(step_id)
                continue
            if step_id in seen or step_id not in by_id:
                continue
            seen.add(step_id)
            stack.append((step_id, True))
            stack.extend((p, False) for p in reversed(by_id[step_id].parents))
    return _errbacks_after_their_jobs(order, by_id)


def _errbacks_after_their_jobs(order: list[str], by_id: Mapping[str, Step]) -> list[str]:
    callbacks = {step_id for step_id in order if by_id[step_id].errback}
    placed: dict[str, None] = {}
    for step_id in order:
        if step_id not in callbacks:
            placed[step_id] = None
            placed.update((i, None) for i in by_id[step_id].graph.get("errbacks") or ())
    # A callback whose job is not in the canvas's rows (none should be) goes last.
    placed.update((i, None) for i in order if i in callbacks)
    return [step_id for step_id in placed if step_id in by_id]


def _fit(column: list[Step], focus: Step | None) -> tuple[list[Step], list[Step]]:
    """The steps of a column drawn, in order, and those left to its "+k more"
    box (an error callback goes where its job goes)."""
    if len(column) <= SHOWN_PER_COLUMN:
        return column, []
    near: set[str] = set()
    if focus is not None:
        graph = focus.graph
        near = {
            focus.id,
            *focus.parents,
            *(graph.get("children") or ()),
            *(graph.get("errbacks") or ()),
        }

    def interest(step: Step) -> tuple[int, int]:
        rank = INTEREST.index(State(step.state)) if step.state in set(State) else 0
        return (0 if step.id in near else 1, rank)

    kept = {step.id for step in sorted(column, key=interest)[: SHOWN_PER_COLUMN - 1]}
    here = {step.id for step in column}
    kept -= {s.id for s in column if s.errback and s.parents and s.parents[0] in here - kept}
    return [s for s in column if s.id in kept], [s for s in column if s.id not in kept]


def _box(x: float, y: float, step: Step, by_id: Mapping[str, Step], focus: str) -> Node:
    indent = INDENT if step.errback else 0.0
    title = f"{step.name}\n{step.id}\n{_status(step, by_id, 255)}"
    if step.error and step.state in (State.FAILED, State.CANCELLED):
        title += f"\n{step.error}"
    return Node(
        x + indent,
        y,
        NODE_WIDTH - indent,
        NODE_HEIGHT,
        step.state,
        step.id,
        _short(step.name, LABEL_CHARS),
        _shortened(_status(step, by_id, 12), STATUS_CHARS),
        title,
        focus=step.id == focus,
        errback=step.errback,
    )


def _status(step: Step, by_id: Mapping[str, Step], names: int) -> str:
    """A step's state, and why it waits or was cancelled, when its row says
    (other tasks' names in at most ``names`` characters)."""
    parents = step.parents
    first = by_id.get(parents[0]) if parents else None
    if step.state == State.WAITING and parents:
        if step.errback:
            return "waiting for its job to fail"
        if len(parents) == 1:
            return f"waiting for {_short(first.name, names) if first else 'a job'}"
        return f"waiting for {step.parents_left} of {len(parents)}"
    if step.state == State.CANCELLED and step.error and step.error.startswith(AFTER_ENDED):
        ended = by_id.get(step.error.rpartition(": ")[2])
        if ended is None:
            return "cancelled: a job before ended"
        return f"cancelled: {_short(ended.name, names)} {ended.state}"
    if step.state == State.CANCELLED and step.errback and first and first.state == State.SUCCEEDED:
        return "cancelled: not needed"
    return step.state


def _more(x: float, y: float, hidden: list[Step]) -> Node:
    counts = Counter(step.state for step in hidden)
    by_state = ", ".join(f"{n} {state}" for state, n in counts.most_common())
    return Node(
        x,
        y,
        NODE_WIDTH,
        NODE_HEIGHT,
        "more",
        None,
        f"+{len(hidden)} more",
        _shortened(by_state, STATUS_CHARS),
        f"{len(hidden)} more steps in this column: {by_state}",
    )


def _edges(
    steps: Sequence[Step],
    placed: Mapping[str, tuple[int, int]],
    boxes: Mapping[tuple[int, int], Node],
) -> list[Edge]:
    """One edge from each drawn job to each drawn step after it (hidden
    steps' edges meet at their "+k more" box), each once."""
    seen: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    edges: list[Edge] = []
    for step in steps:
        to = placed.get(step.id)
        for parent in step.parents:
            start = placed.get(parent)
            if to is None or start is None or (start, to) in seen or start == to:
                continue
            seen.add((start, to))
            source, target = boxes[start], boxes[to]
            if step.errback and start[0] == to[0]:
                # Down the job's left side, then across into its callback.
                left, middle = source.x + INDENT / 2, target.y + target.height / 2
                path = f"M{left:.1f} {source.y + source.height:.1f} V{middle:.1f} H{target.x:.1f}"
                edges.append(Edge(path, True))
                continue
            x1, y1 = source.x + source.width, source.y + source.height / 2
            x2, y2 = target.x, target.y + target.height / 2
            bend = (x2 - x1) / 2
            path = (
                f"M{x1:.1f} {y1:.1f} "
                f"C{x1 + bend:.1f} {y1:.1f} {x2 - bend:.1f} {y2:.1f} {x2:.1f} {y2:.1f}"
            )
            edges.append(Edge(path, step.errback))
    return edges


def _summary(steps: Sequence[Step], drawn: range, count: int) -> str:
    counts = Counter(step.state for step in steps)
    states = ", ".join(f"{counts[state]} {state}" for state in State if counts[state])
    found = f"{_counted(len(steps), 'step')} in {_counted(count, 'column')}: {states}."
    if len(drawn) < count:
        found += f" Drawn: columns {drawn.start + 1} to {drawn.stop}, around this job."
    return found


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _short(name: str, most: int) -> str:
    """A task's name without its module (``proj.tasks.charge``: ``charge``),
    in at most ``most`` characters."""
    return _shortened(name.rpartition(".")[2] or name, most)


def _shortened(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"
