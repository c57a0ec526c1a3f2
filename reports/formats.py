"""One entry point for every report format, so the CLI and the pytest plugin name formats the same way."""

from __future__ import annotations

from ..results import RunSummary
from .extras import ReportExtras

FORMATS = ("text", "json", "junit", "html", "ocp", "prom")
"""Report formats, as `--format` and `chipcheck run --report FORMAT=FILE` spell them: ocp is OCP Test &
Validation diagnostic output (JSON lines), prom the Prometheus node_exporter textfile format."""
NEEDS_EXTRAS = frozenset({"junit", "html", "ocp", "prom"})
"""Formats that show more than the summary when given `ReportExtras` (history, DUT info, links)."""


class UnknownFormat(ValueError):
    """A format name outside FORMATS (exit 2)."""


def render(s: RunSummary, fmt: str, extras: ReportExtras | None = None) -> str:
    """The report of `s` in `fmt` as text; HTML and JUnit pull in their libraries only when asked for."""
    if extras is None and s.links is not None:
        from .extras import from_links

        extras = from_links(s)
    if fmt == "text":
        from . import terminal

        return terminal.render(s) + "\n"
    if fmt == "json":
        from . import json_report

        return json_report.render(s) + "\n"
    if fmt == "junit":
        from . import junit

        return junit.render(s, extras)
    if fmt == "html":
        from . import html

        return html.render(s, extras)
    if fmt == "ocp":
        from . import ocp

        return ocp.render(s, extras)
    if fmt == "prom":
        from . import prom

        return prom.render(s, extras)
    raise UnknownFormat(f"unknown report format {fmt!r}; known: {', '.join(FORMATS)}")


def json_schema() -> dict[str, object]:
    """The JSON Schema of `chipcheck.run/1` (shipped as package data: reports/schema/run-1.json)."""
    import json
    from importlib import resources

    return json.loads(resources.files("chipcheck.reports").joinpath("schema/run-1.json").read_text())
