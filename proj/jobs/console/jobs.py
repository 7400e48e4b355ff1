"""The console's jobs list (filters, bulk actions) and job pages."""

from __future__ import annotations

from flask import render_template

from proj.jobs.console.site import blueprint


@blueprint.get("/jobs")
def jobs() -> str:
    return render_template("proj_console/overview.html")
