"""Server-rendered charts: the geometry of each shape, in SVG user units, for
a template to draw as inline SVG (no script; colours come from the
stylesheet's classes, since the content security policy forbids inline
styles)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

WIDTH = 720.0
"""Every chart's width in SVG units (it scales to the page's)."""


@dataclass(frozen=True)
class Box:
    """A rectangle: one bar, or one series' part of a stacked bar."""

    x: float
    y: float
    width: float
    height: float
    key: str
    """The series (a state name: the stylesheet colours it)."""
    label: str
    """What the bar stands for (a minute, a queue)."""
    count: int
    title: str
    """The bar in words (its tooltip)."""


@dataclass(frozen=True)
class Tick:
    """A labelled place on an axis."""

    at: float
    label: str


@dataclass(frozen=True)
class StackedBars:
    """Columns of stacked bars, with their axes and legend."""

    width: float
    height: float
    left: float
    right: float
    top: float
    bottom: float
    """The plot area's edges."""
    boxes: Sequence[Box]
    x_ticks: Sequence[Tick]
    y_ticks: Sequence[Tick]
    legend: Sequence[Tick]
    """Each series' key (as ``label``) and where its entry starts."""
    peak: int
    """The top of the vertical axis."""


def stacked_bars(
    columns: Sequence[tuple[datetime, Mapping[str, int]]],
    series: Sequence[str],
    *,
    every: int = 10,
    height: float = 260.0,
) -> StackedBars:
    """One column a minute, ``series`` stacked bottom to top, with the time of
    day under every ``every``-th column. Empty parts draw nothing."""
    left, right, top, bottom = 52.0, WIDTH - 12.0, 34.0, height - 46.0
    peak = nice_ceiling(max((sum(counts.values()) for _, counts in columns), default=0))
    step = (right - left) / max(len(columns), 1)
    scale = (bottom - top) / peak
    boxes: list[Box] = []
    x_ticks: list[Tick] = []
    for n, (minute, counts) in enumerate(columns):
        x = left + n * step
        if n % every == 0:
            x_ticks.append(Tick(x, minute.strftime("%H:%M")))
        base = bottom
        for key in series:
            count = counts.get(key, 0)
            if not count:
                continue
            size = count * scale
            base -= size
            title = f"{minute:%H:%M} UTC: {count} {key}"
            boxes.append(
                Box(x + step * 0.1, base, step * 0.8, size, key, minute.isoformat(), count, title)
            )
    y_ticks = [Tick(bottom - value * scale, str(value)) for value in sorted({0, peak // 2, peak})]
    legend = [Tick(right - (len(series) - n) * 84.0, key) for n, key in enumerate(series)]
    return StackedBars(
        WIDTH, height, left, right, top, bottom, boxes, x_ticks, y_ticks, legend, peak
    )


@dataclass(frozen=True)
class HorizontalBars:
    """One bar a row, labelled on its left, its count on its right."""

    width: float
    height: float
    left: float
    """Where the bars start (their labels end there)."""
    boxes: Sequence[Box]


def horizontal_bars(counts: Mapping[str, int], key: str, *, row: float = 28.0) -> HorizontalBars:
    """A bar for each of ``counts`` (in its order), drawn in series ``key``,
    the longest as wide as the chart allows."""
    left, span = 180.0, WIDTH - 180.0 - 70.0
    peak = max(counts.values(), default=0) or 1
    boxes = [
        Box(
            left,
            n * row + 4.0,
            max(span * count / peak, 1.0),
            row - 8.0,
            key,
            label,
            count,
            f"{label}: {count}",
        )
        for n, (label, count) in enumerate(counts.items())
    ]
    return HorizontalBars(WIDTH, len(boxes) * row, left, boxes)


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50… that is at least ``value``."""
    ceiling = 1
    while True:
        for factor in (1, 2, 5):
            if ceiling * factor >= value:
                return ceiling * factor
        ceiling *= 10
