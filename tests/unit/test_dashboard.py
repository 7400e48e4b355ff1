"""The Grafana dashboard (``docs/grafana/proj-jobs.json``) queries only what
proj exposes, and adds up per-process counters across scrape targets."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proj.jobs import metrics
from proj.jobs.metrics_api import LedgerFigures, gauges

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "proj-jobs.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exposed() -> set[str]:
    """Every sample name of proj's metrics (the counted ones and the ledger's gauges)."""
    figures = LedgerFigures(datetime.now(UTC), {}, {}, 0, None)
    families = [
        family for metric in vars(metrics.meters()).values() for family in metric.describe()
    ]
    families += gauges(figures)
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def queries(dashboard: dict[str, Any]) -> list[str]:
    """The panels' PromQL."""
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_metric_queried_is_exposed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    named = {name for query in queries(dashboard) for name in re.findall(r"proj_\w+", query)}
    assert named - exposed() == set()
    [task] = [v for v in dashboard["templating"]["list"] if v["name"] == "task"]
    [selector] = re.findall(r'__name__=~"([^"]+)"', task["definition"])
    assert {name for name in exposed() if re.fullmatch(selector, name)} == {
        "proj_jobs_enqueued_total",
        "proj_jobs_finished_total",
    }


def test_rates_are_added_up_across_targets() -> None:
    """A rate is summed (``sum``, ``sum by``) so that every worker pod's
    series, and a restarted pod's, count."""
    for query in queries(json.loads(DASHBOARD.read_text())):
        if "rate(" in query:
            assert re.match(r"(histogram_quantile\(0\.\d+, )?sum( by \([a-z, ]+\) )?\(", query), (
                query
            )
