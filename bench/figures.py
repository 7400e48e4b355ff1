"""What a benchmark run measures, by variant and by stack, and the Markdown
tables it reports them in (drain figures as ratios against the baseline and
``pgbench``, the relay against raw publishing, all from the same run)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.limits import BrokerRates


@dataclass
class Figures:
    """What one variant did on one stack, over all its rounds."""

    stack: str
    variant: str
    enqueue_rates: list[float] = field(default_factory=list)
    drain_rates: list[float] = field(default_factory=list)
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    statements: float = 0.0
    """Worker-side SQL statements per task."""
    round_trips: float = 0.0
    """Worker-side round trips to the database per task (see :mod:`bench.stats`)."""
    enqueue_statements: list[float] = field(default_factory=list)
    """SQL statements per enqueue, by round."""
    results_stored: bool = False
    """Whether the worker stored the tasks' results in Celery's result backend."""
    connections_at_rest: int | None = None
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    """CPU milliseconds per task while draining: the worker (all its
    processes), PostgreSQL (every server process) and the broker."""
    rss_mb: tuple[float, float] | None = None
    """The worker's memory (all its processes) after 1,000 and after ``--rss-tasks`` tasks."""
    problems: list[str] = field(default_factory=list)
    """What the checks found wrong: counters that differ from the tasks sent,
    connections a stopped worker left open."""

    @property
    def correct(self) -> bool:
        """Whether every check passed."""
        return not self.problems

    @property
    def drain(self) -> float:
        """Tasks a second drained, the median of the rounds."""
        return statistics.median(self.drain_rates)


@dataclass
class Limits:
    """A stack's limits, measured in the same run as its variants."""

    stack: str
    relay: float
    pgbench: float | None
    broker: BrokerRates | None


def table(results: list[Figures], pgbench: dict[str, float]) -> str:
    """The variants' figures, each against its stack's baseline and ``pgbench``."""
    baseline = {f.stack: f for f in results if f.variant == "baseline"}
    lines = [
        "| stack | variant | Celery results stored | enqueue/s | drain tasks/s (min–max) "
        "| × baseline | × pgbench | latency p50 / p99 ms "
        "| SQL statements / round trips per task (worker) | SQL per enqueue "
        "| CPU ms per task: worker / PostgreSQL / broker | connections at rest "
        "| RSS MiB after 1k → after N | counters correct |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in results:
        base = baseline.get(f.stack)
        ratio = f"{f.drain / base.drain:.2f}" if base and base is not f else "—"
        limit = f"{f.drain / pgbench[f.stack]:.2f}" if f.stack in pgbench else "—"
        rss = f"{f.rss_mb[0]:.0f} → {f.rss_mb[1]:.0f}" if f.rss_mb else "—"
        cpu = " / ".join(
            f"{statistics.median(f.cpu_ms[part]):.2f}" if f.cpu_ms.get(part) else "—"
            for part in ("worker", "postgres", "broker")
        )
        lines.append(
            f"| {f.stack} | {f.variant} | {'yes' if f.results_stored else 'no'} "
            f"| {statistics.median(f.enqueue_rates):.0f} "
            f"| {f.drain:.0f} ({min(f.drain_rates):.0f}–{max(f.drain_rates):.0f}) | {ratio} "
            f"| {limit} | {f.latency_p50:.1f} / {f.latency_p99:.1f} "
            f"| {f.statements:.1f} / {f.round_trips:.1f} "
            f"| {statistics.median(f.enqueue_statements):.1f} | {cpu} "
            f"| {'—' if f.connections_at_rest is None else f.connections_at_rest} | {rss} "
            f"| {'yes' if f.correct else 'NO'} |"
        )
    return "\n".join(lines)


def limits_table(found: list[Limits]) -> str:
    """The stacks' limits; the relay against raw publishing without confirms
    (the broker's limit) and with them."""
    lines = [
        "| stack | pgbench tps (same transaction, 2 clients) | relay jobs/s (fast path off) "
        "| raw kombu publish/s, no confirms | raw publish/s, confirms awaited together "
        "| raw kombu consume/s | relay × raw publish | relay × confirmed publish |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in found:
        tps = "—" if f.pgbench is None else f"{f.pgbench:.0f}"
        publish = consume = against = confirmed = against_confirmed = "—"
        if f.broker is not None:
            publish, consume = f"{f.broker.publish:.0f}", f"{f.broker.consume:.0f}"
            against = f"{f.relay / f.broker.publish:.2f}"
            if f.broker.confirmed is not None:
                confirmed = f"{f.broker.confirmed:.0f}"
                against_confirmed = f"{f.relay / f.broker.confirmed:.2f}"
        lines.append(
            f"| {f.stack} | {tps} | {f.relay:.0f} | {publish} | {confirmed} | {consume} "
            f"| {against} | {against_confirmed} |"
        )
    return "\n".join(lines)


def problems(results: list[Figures]) -> str:
    """The checks that failed, one line each ("" if none did)."""
    return "".join(f"- {f.stack} {f.variant}: {p}\n" for f in results for p in f.problems)
