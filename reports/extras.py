"""Optional report inputs that live outside `RunSummary`: links, inferred topology, device history.

The types are the core's (results.py), since fleet/ builds them; they are re-exported here for the
reports' own use. Every report renders without them and adds the matching section (link heatmap,
topology, trend lines, JUnit link testcases) when they are given, so a producer only has to fill
`ReportExtras`.
"""

from __future__ import annotations

from ..results import HistoryPoint, LinkSummary, ReportExtras, RunSummary, Topology

__all__ = ["HistoryPoint", "LinkSummary", "ReportExtras", "Topology", "from_links"]


def from_links(s: RunSummary) -> ReportExtras:
    """The link heatmap and topology sections from a run's judged link sweep."""
    return ReportExtras.from_links(s)
