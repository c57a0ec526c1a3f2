"""The HTML report's plots, drawn by matplotlib (Agg, no display) and returned as inline documents.

Large plots are SVG (text stays text: small, crisp, searchable); small multiples (bit histograms,
trend lines) are PNG, which stays a few KB however many marks it has. Element ids are salted per
plot so several inline SVGs can share one page and the output is the same for the same input.
"""

from __future__ import annotations

import base64
import io
import math
import statistics
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # before pyplot: never look for a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..results import Verdict  # noqa: E402
from .extras import HistoryPoint, LinkSummary, Topology  # noqa: E402
from .view import DTYPE_BITS, BitHistogram, FailureMode, ThroughputGroup  # noqa: E402

COLORS = {Verdict.PASS: "#2e7d32", Verdict.SLOW: "#ef8c00", Verdict.FLAKY: "#8e24aa", Verdict.WRONG: "#c62828",
          Verdict.ERROR: "#546e7a", Verdict.SUSPECT: "#00838f"}
_RC = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
       "font.family": "sans-serif"}
MAX_LABELLED_OUTLIERS = 12
MAX_GROUPS = 24
MAX_HEATMAP_ENDPOINTS = 128


@contextmanager
def _figure(w: float, h: float, salt: str) -> Iterator[Figure]:
    with plt.rc_context(cast(Any, {**_RC, "svg.hashsalt": salt})):  # matplotlib types rc keys as literals
        fig = Figure(figsize=(w, h))  # not pyplot's registry: nothing to leak, safe in threads
        yield fig


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    # drop the XML prolog and DOCTYPE: the SVG is inlined into HTML
    return text[text.index("<svg"):]


def _png_b64(fig: Figure, dpi: int = 72) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def verdict_bars(devices: dict[Verdict, int], links: dict[Verdict, int] | None = None) -> str:
    """Devices (and links) per verdict, as horizontal bars with counts."""
    rows = [("devices", devices)] + ([("links", links)] if links else [])
    with _figure(6.0, 0.55 + 0.45 * len(rows), "verdicts") as fig:
        ax = fig.add_subplot()
        for y, (_, counts) in enumerate(rows):
            total = sum(counts.values()) or 1
            left = 0.0
            for v in Verdict:
                n = counts.get(v, 0)
                if not n:
                    continue
                ax.barh(y, n / total, left=left, color=COLORS[v], height=0.6)
                if n / total > 0.06:
                    ax.text(left + n / total / 2, y, f"{v.value} {n}", ha="center", va="center", color="white",
                            fontsize=8)
                left += n / total
        ax.set_yticks(range(len(rows)), [f"{name} ({sum(c.values())})" for name, c in rows])
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.invert_yaxis()
        ax.legend(handles=[matplotlib.patches.Patch(color=COLORS[v], label=v.value) for v in Verdict
                           if any(c.get(v) for _, c in rows)],
                  ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False, fontsize=8)
        return _svg(fig)


def failure_modes(modes: list[FailureMode], limit: int = 15) -> str:
    """Fraction of the fleet hit by each failure mode (a device can show several)."""
    shown = modes[:limit]
    with _figure(6.0, 0.5 + 0.28 * len(shown), "modes") as fig:
        ax = fig.add_subplot()
        ys = range(len(shown))
        ax.barh(ys, [m.fraction for m in shown], color=[COLORS[m.verdict] for m in shown], height=0.6)
        for y, m in zip(ys, shown, strict=True):
            ax.text(m.fraction, y, f" {m.fraction:.2%} ({len(m.ranks)})", va="center", fontsize=8)
        ax.set_yticks(list(ys), [m.name for m in shown])
        ax.invert_yaxis()
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
        ax.set_xlim(0, max(m.fraction for m in shown) * 1.35)
        ax.set_xlabel("fraction of the fleet")
        return _svg(fig)


def throughput_groups(groups: list[ThroughputGroup]) -> str:
    """Per fingerprint group, each device's throughput against the group median; slow ones marked."""
    shown = groups[:MAX_GROUPS]
    with _figure(max(4.0, 1.0 + 0.9 * len(shown)), 3.2, "throughput") as fig:
        ax = fig.add_subplot()
        # box plots, not one mark per device: 10,000 devices must not mean 10,000 SVG paths
        ax.boxplot([g.ratios for g in shown], positions=range(len(shown)), widths=0.5, showfliers=False,
                   medianprops={"color": "#333"})
        labelled = 0
        for x, g in enumerate(shown):
            if not g.outliers:
                continue
            ys = [r for _, _, r in g.outliers]
            ax.scatter([x] * len(ys), ys, marker="x", color=COLORS[Verdict.SLOW], zorder=3, s=30)
            for _, label, r in g.outliers:
                if labelled < MAX_LABELLED_OUTLIERS:
                    ax.annotate(f"{label} {r:.2f}x", (x, r), xytext=(6, 0), textcoords="offset points",
                                fontsize=7, va="center", color=COLORS[Verdict.SLOW])
                    labelled += 1
        ax.axhline(1.0, color="#999", lw=0.8, ls="--")
        ax.set_xticks(range(len(shown)), [f"{g.fingerprint}\n{g.devices} dev"
                                          + (f", {statistics.median(g.median_tflops.values()):.3g} TF/s"
                                             if g.median_tflops else "")
                                          for g in shown], fontsize=7)
        ax.set_ylabel("throughput / group median")
        return _svg(fig)


def bit_histogram(h: BitHistogram) -> str:
    """Flipped bit positions over the dtype's full width, sign/exponent/mantissa shaded (PNG, base64)."""
    width, exp0, sign = DTYPE_BITS.get(h.dtype, (max(b for b, _ in h.counts) + 1, -1, -1))
    with _figure(3.2, 1.1, "bits") as fig:
        ax = fig.add_subplot()
        if exp0 >= 0:
            ax.axvspan(exp0 - 0.5, sign - 0.5, color="#fff3e0", zorder=0)
            ax.axvspan(sign - 0.5, sign + 0.5, color="#fce4ec", zorder=0)
        ax.bar([b for b, _ in h.counts], [n for _, n in h.counts], color=COLORS[Verdict.WRONG], width=0.8)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_xticks(sorted({0, width - 1, *(b for b, _ in h.counts)}))
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        ax.set_title(f"{h.dtype} bits (mantissa | exponent | sign)" if exp0 >= 0 else f"{h.dtype} bits", fontsize=7)
        fig.tight_layout(pad=0.2)
        return _png_b64(fig, dpi=90)


def trend(points: list[HistoryPoint]) -> str:
    """A device's earlier runs as a small trend line: throughput ratio, dots coloured by verdict (PNG)."""
    with _figure(2.4, 0.6, "trend") as fig:
        ax = fig.add_axes((0.02, 0.1, 0.96, 0.8))
        xs = list(range(len(points)))
        ys = [p.throughput_ratio if p.throughput_ratio is not None else math.nan for p in points]
        ax.plot(xs, ys, color="#607d8b", lw=1)
        ax.scatter(xs, [1.0 if math.isnan(y) else y for y in ys], c=[COLORS[p.verdict] for p in points], s=10,
                   zorder=3)
        ax.axhline(1.0, color="#bbb", lw=0.6, ls="--")
        ax.set_axis_off()
        return _png_b64(fig, dpi=80)


def link_heatmap(links: list[LinkSummary]) -> str:
    """Bus bandwidth of every measured pair, failing links outlined."""
    ends = sorted({x for lk in links for x in (lk.src, lk.dst)})[:MAX_HEATMAP_ENDPOINTS]
    idx = {e: i for i, e in enumerate(ends)}
    grid = [[math.nan] * len(ends) for _ in ends]
    bad: list[tuple[int, int, Verdict]] = []
    for lk in links:
        if lk.src in idx and lk.dst in idx:
            i, j = idx[lk.src], idx[lk.dst]
            val = lk.busbw_gbps if lk.busbw_gbps is not None else math.nan
            grid[i][j] = grid[j][i] = val
            if lk.verdict is not Verdict.PASS:
                bad.append((i, j, lk.verdict))
    side = min(9.0, 2.5 + 0.18 * len(ends))
    with _figure(side + 1.2, side, "links") as fig:
        ax = fig.add_subplot()
        im = ax.imshow(grid, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="bus bandwidth (GB/s)", shrink=0.8)
        for i, j, v in bad:
            for a, b in ((i, j), (j, i)):
                ax.add_patch(matplotlib.patches.Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False,
                                                          edgecolor=COLORS[v], lw=1.5))
        if len(ends) <= 48:
            ax.set_xticks(range(len(ends)), ends, rotation=90, fontsize=6)
            ax.set_yticks(range(len(ends)), ends, fontsize=6)
        return _svg(fig)


def topology(t: Topology) -> str:
    """The inferred topology as an icicle chart: one band per level, one block per group."""
    ends = sorted(t.placement, key=lambda e: (t.placement[e], e))
    with _figure(8.0, 0.6 + 0.45 * len(t.levels), "topology") as fig:
        ax = fig.add_subplot()
        for lvl in range(len(t.levels)):
            start = 0
            while start < len(ends):
                key = t.placement[ends[start]][: lvl + 1]
                stop = start
                while stop < len(ends) and t.placement[ends[stop]][: lvl + 1] == key:
                    stop += 1
                ax.barh(lvl, stop - start, left=start, height=0.85, color=f"C{zlib.crc32(key[-1].encode()) % 10}", alpha=0.55,
                        edgecolor="white")
                if (stop - start) / len(ends) > 0.04:
                    ax.text((start + stop) / 2, lvl, key[-1], ha="center", va="center", fontsize=7)
                start = stop
        ax.set_yticks(range(len(t.levels)), list(t.levels))
        ax.invert_yaxis()
        ax.set_xlim(0, len(ends))
        ax.set_xlabel(f"{len(ends)} endpoints, grouped")
        return _svg(fig)
