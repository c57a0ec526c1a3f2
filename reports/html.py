"""The HTML report: one self-contained file (no network, every asset inline) a person can mail.

Rendered from Jinja2 templates (`reports/templates/`), plots by matplotlib (`reports.plots`). Built
to stay small for a sweep of 10,000 devices: the device table travels as compact JSON that a small
inline script renders, sorts and filters; only failures get cards; identical bit histograms are
drawn once and shared through a CSS class; passing devices get no per-device plot.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from dataclasses import dataclass, field

import jinja2

from .. import __version__
from ..results import RunSummary, Verdict
from . import plots, view
from .extras import ReportExtras

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("chipcheck.reports", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,  # a typo in a template fails the render, not the reader
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HtmlOptions:
    max_cards: int = 200
    """Failure cards drawn in full; the rest are one line each (the device table has them all)."""
    max_histograms: int = 64
    """Distinct bit-histogram plots; beyond that a card shows its histogram as text."""
    max_indices: int = 8
    """First bad indices listed per finding."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plots:
    verdicts: str
    modes: str
    throughput: str
    links: str
    topology: str
    histogram_css: dict[str, str] = field(default_factory=dict)
    """BitHistogram.key -> CSS class holding the PNG (drawn once, used by every card that has it)."""
    trends: dict[str, str] = field(default_factory=dict)
    """Device UUID -> PNG (base64) of its trend line; failing devices only."""


def render(s: RunSummary, extras: ReportExtras | None = None, options: HtmlOptions | None = None) -> str:
    """The whole report as one HTML document."""
    extras = extras or ReportExtras()
    options = options or HtmlOptions()
    v = view.build(s)
    cards = v.cards[: options.max_cards]
    drawn = _plots(v, cards, extras, options)
    link_counts = Counter(lk.verdict for lk in extras.links)
    failing_links = sorted((lk for lk in extras.links if lk.verdict is not Verdict.PASS),
                           key=lambda lk: (lk.verdict.value, lk.src, lk.dst))
    return _ENV.get_template("report.html.j2").render(
        v=v, s=s, cards=cards, more_cards=v.cards[options.max_cards:], plots=drawn, options=options,
        extras=extras, link_counts={x: link_counts.get(x, 0) for x in Verdict}, failing_links=failing_links,
        histogram_css_rules=[(cls, b64) for cls, b64 in _histogram_rules(cards, drawn)],
        device_data=_device_json(v), version=__version__, Verdict=Verdict, when=_when,
    )


def _plots(v: view.RunView, cards: list[view.FailureCard], extras: ReportExtras, options: HtmlOptions) -> _Plots:
    css: dict[str, str] = {}
    for c in cards:
        for h in c.histograms:
            if h.key not in css and len(css) < options.max_histograms:
                css[h.key] = f"bh{len(css)}"
    trends = {}
    for c in cards:
        pts = extras.history.get(c.uuid)
        if pts and c.uuid not in trends:
            trends[c.uuid] = plots.trend(pts)
    return _Plots(
        verdicts=plots.verdict_bars(v.counts, Counter(lk.verdict for lk in extras.links) or None),
        modes=plots.failure_modes(v.modes) if v.modes else "",
        throughput=plots.throughput_groups(v.groups) if v.groups else "",
        links=plots.link_heatmap(extras.links) if extras.links else "",
        topology=plots.topology(extras.topology) if extras.topology and extras.topology.placement else "",
        histogram_css=css, trends=trends,
    )


def _histogram_rules(cards: list[view.FailureCard], drawn: _Plots) -> list[tuple[str, str]]:
    by_key = {h.key: h for c in cards for h in c.histograms}
    return [(cls, plots.bit_histogram(by_key[key])) for key, cls in drawn.histogram_css.items()]


def _device_json(v: view.RunView) -> str:
    """The device table as compact JSON (columns once, rows as arrays), safe inside <script>."""
    first_card: dict[int, str] = {}
    for c in v.cards:
        first_card.setdefault(c.rank, c.anchor)
    rows = [[r.rank, r.device, r.host, r.uuid, r.fingerprint, r.verdict.value,
             round(r.ratio, 3) if r.ratio is not None else None, r.probes, r.summary, first_card.get(r.rank, "")]
            for r in v.rows]
    doc = {"cols": ["rank", "device", "host", "uuid", "fingerprint", "verdict", "ratio", "probes", "summary",
                    "card"], "rows": rows}
    # no "<" at all inside the script element: "</script" would end it, "<!--" could change its parsing
    return json.dumps(doc, separators=(",", ":")).replace("<", "\\u003c")


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "-"
