"""Optional report inputs that live outside `RunSummary`: links, inferred topology, device history.

The link probes, the topology inference and the fleet history are built elsewhere (fleet/); the
reports only need their results in these plain shapes. Every report renders without them and
adds the matching section (link heatmap, topology, trend lines, JUnit link testcases) when they
are given, so a producer only has to fill `ReportExtras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..results import DeviceInfo, RunSummary, Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSummary:
    """One link (a pair of endpoints) after judgement."""

    src: str
    """Endpoint label, e.g. `node7 cuda:3` (the same text the device table shows)."""
    dst: str
    verdict: Verdict
    busbw_gbps: float | None = None
    """Measured bus bandwidth; None when the link could not be measured."""
    latency_us: float | None = None
    reason: str = ""
    """One line a person can act on (empty for a passing link)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Where each endpoint sits, outermost level first (e.g. building, room, rack, node)."""

    levels: tuple[str, ...]
    """Level names, outermost first: ("room", "rack", "node")."""
    placement: dict[str, tuple[str, ...]]
    """Endpoint label -> its group at each level (same length as `levels`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryPoint:
    """One past run of one device: what it was judged and how fast it was against its peers."""

    run_id: str
    started: float
    verdict: Verdict
    throughput_ratio: float | None = None
    """Throughput relative to the fingerprint peers' median in that run (1.0 = typical)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportExtras:
    """Everything a report can show beyond the run itself; all of it optional."""

    links: list[LinkSummary] = field(default_factory=list)
    topology: Topology | None = None
    history: dict[str, list[HistoryPoint]] = field(default_factory=dict)
    """Device UUID -> its earlier runs, oldest first."""
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    """Device UUID -> what discovery found (serial, driver, libraries): the OCP report's DUT info."""
    min_gap: float | None = None
    """The run's --min-gap (throughput shortfall against peers that counts as slow), when known."""


def from_links(s: RunSummary) -> ReportExtras:
    """The link heatmap and topology sections from a run's judged link sweep."""
    assert s.links is not None
    label = {d.rank: f"{d.host} {d.device}" for d in s.devices}
    links = [LinkSummary(src=label.get(x.src, str(x.src)), dst=label.get(x.dst, str(x.dst)), verdict=x.verdict,
                         busbw_gbps=x.gbps, latency_us=x.latency_us, reason=x.reason) for x in s.links.links]
    topology = None
    if s.links.topology_levels:
        topology = Topology(levels=tuple(s.links.topology_levels),
                            placement={label.get(i, str(i)): tuple(f"{lvl} {g}" for lvl, g in
                                                                   zip(s.links.topology_levels, grp, strict=False))
                                       for i, grp in enumerate(s.links.topology_groups)})
    return ReportExtras(links=links, topology=topology)
