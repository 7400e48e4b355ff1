"""The console's overview, periodic tasks and workers pages."""

from __future__ import annotations

from flask import render_template

from proj.jobs.console.site import blueprint


@blueprint.get("/")
def overview() -> str:
    return render_template("proj_console/overview.html")


@blueprint.get("/periodic")
def periodic() -> str:
    return render_template("proj_console/overview.html")


@blueprint.get("/workers")
def workers() -> str:
    return render_template("proj_console/overview.html")
