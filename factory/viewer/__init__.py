"""Seeing volumes: NiiVue in the browser (vendored under ``static/``, shared with the serve page)
and ``ctfactory view``, a local web app that lists a cohort's manifest and opens its volumes."""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"  # NiiVue and the viewer built on it, served at /viewer
