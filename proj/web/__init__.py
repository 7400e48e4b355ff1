"""proj's web tier: ``flask --app proj.web run`` finds :func:`create_app`."""

from __future__ import annotations

from proj.web.app import create_app

__all__ = ["create_app"]
