"""The links judge: slow and corrupting links and endpoints.

Pure functions over measurements (no torch, no I/O). The links probe measures each scheduled
pair in both directions (latency, bandwidth, a payload checksum); this module decides:
- slow: a directed link's bandwidth against the median of *comparable* links (intra-host with
  intra-host, inter-host with inter-host: NVLink and the network differ by 10x), by a minimum
  relative gap and, with >= 5 comparable links, a robust median/MAD outlier test; or its latency
  the same way, above the median;
- localization: a problem seen on most links of one endpoint in one direction belongs to that
  endpoint (a throttled NIC, a chip corrupting what it sends); a problem on one link whose ends
  are otherwise fine belongs to the link (a cable, a port). Only the accused endpoint fails; its
  innocent peers pass.
The topology inferred from the same latency matrix is fleet/topology.py's.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...results import SEVERITY, LinkJudgement, Verdict

Matrix = list[list[float | None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkMeasurement:
    """One direction src -> dst of one pair, as the links probe measured it."""

    src: int
    dst: int
    latency_us: float | None
    gbps: float | None
    bad_bytes: int = 0
    """Payload bytes that arrived different from what was sent."""
    total_bytes: int = 0
    """Payload bytes checked."""
    error: str = ""
    """Why the direction could not be measured (timeout, crash...); empty when it was."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkPolicy:
    """Thresholds of the link judgement."""

    min_gap: float = 0.25
    """Minimum relative bandwidth shortfall against the comparable links' median (0.25 = 25% slower)."""
    z: float = 3.5
    """Robust z-score (|x - median| / (1.4826 MAD)) a slow link must also exceed, with >= 5 comparable links."""
    latency_gap: float = 0.5
    """Minimum relative latency excess over the comparable links' median (0.5 = 1.5x the median)."""
    endpoint_share: float = 0.6
    """Share of an endpoint's links in one direction (over >= 2 partners) that must fail to blame the endpoint."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointVerdict:
    """One endpoint after localization: failing only when the problem is its own, not its peers'."""

    endpoint: int
    verdict: Verdict
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkReport:
    """All links and endpoints of one run, plus N x N matrices (row = src, column = dst)."""

    links: list[LinkJudgement]
    """Each directed link after judgement (results.LinkJudgement: what the run summary stores)."""
    endpoints: list[EndpointVerdict]
    latency: Matrix
    """Microseconds; None where unmeasured (and on the diagonal)."""
    bandwidth: Matrix
    """GB/s (10^9 bytes per second); None where unmeasured."""
    errors: list[list[int]]
    """Corrupted payload bytes per direction (0 where clean or unmeasured)."""


MIN_FOR_MAD = 5
"""Comparable links needed before the robust outlier test applies (below it only the gap counts)."""


@dataclass(slots=True)
class _Link:
    """A directed link with its attempts merged, and what the judgement found on it."""

    src: int
    dst: int
    latency_us: float | None = None
    gbps: float | None = None
    bad_bytes: int = 0
    total_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    attempts: int = 0
    bw_ratio: float | None = None
    lat_ratio: float | None = None
    bw_peers: tuple[float, int, int] = (0.0, 0, 0)
    lat_peers: tuple[float, int, int] = (0.0, 0, 0)
    """(median, count) of the links its ratio is against (`_peers`), and how many its class holds:
    what its reason quotes."""
    slow_bw: bool = False
    slow_lat: bool = False
    cls: str = ""
    """The links it is compared with (intra-host, inter-host, or inter-host at one placement depth)."""
    path: str = ""
    """"intra-host" or "inter-host": the hardware a problem can live in (NVLink vs NIC and network)."""

    @property
    def errored(self) -> bool:
        # an attempt that produced numbers outweighs one that errored (a retry succeeded)
        return bool(self.errors) and self.gbps is None and self.latency_us is None

    @property
    def slow(self) -> bool:
        return self.slow_bw or self.slow_lat

    @property
    def wrong(self) -> bool:
        return self.bad_bytes > 0


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _merge(measurements: Iterable[LinkMeasurement], n: int) -> dict[tuple[int, int], _Link]:
    """One record per direction; repeated attempts keep the best numbers (noise only ever slows a
    transfer, like `tflops_best`) and add up the corrupted bytes (corruption is never averaged away)."""
    links: dict[tuple[int, int], _Link] = {}
    for m in measurements:
        if not (0 <= m.src < n and 0 <= m.dst < n) or m.src == m.dst:
            raise ValueError(f"link {m.src}->{m.dst} is not a link between two of the {n} endpoints")
        rec = links.setdefault((m.src, m.dst), _Link(src=m.src, dst=m.dst))
        rec.attempts += 1
        rec.bad_bytes += m.bad_bytes
        rec.total_bytes += m.total_bytes
        if m.error:
            rec.errors.append(m.error)
            continue
        lat, bw = _finite(m.latency_us), _finite(m.gbps)
        if lat is not None:
            rec.latency_us = lat if rec.latency_us is None else min(rec.latency_us, lat)
        if bw is not None:
            rec.gbps = bw if rec.gbps is None else max(rec.gbps, bw)
    return links


def _robust(values: list[float]) -> tuple[float, float]:
    med = statistics.median(values)
    return med, statistics.median(abs(v - med) for v in values)


def _outlier(excess: float, mad: float, count: int, z: float) -> bool:
    """Robust test on `excess` (distance from the median on the bad side), skipped for few links."""
    if count < MIN_FOR_MAD:
        return True
    if mad == 0:
        return excess > 0
    return excess / (1.4826 * mad) >= z


def _classify(links: dict[tuple[int, int], _Link], hosts: Mapping[int, str],
              placement: Mapping[int, tuple[str, ...]] | None) -> None:
    for (s, d), rec in links.items():
        same_host = s in hosts and hosts.get(s) == hosts.get(d)
        rec.path = rec.cls = "intra-host" if same_host else "inter-host"
        if placement is not None and s in placement and d in placement:
            # links are compared with links that span the same distance: leaving a rack costs more
            # than staying in it, and inside a host two endpoints on one core (or NVLink island)
            # talk differently from two on different ones
            a, b = placement[s], placement[d]
            depth = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            rec.cls = f"{rec.path} (sharing {depth} placement level{'s' if depth != 1 else ''})"


def _judge_speed(links: dict[tuple[int, int], _Link], policy: LinkPolicy) -> None:
    """Flag slow links, each against the median of its class less the links of slow endpoints."""
    by_cls: dict[str, list[_Link]] = defaultdict(list)
    for rec in links.values():
        by_cls[rec.cls].append(rec)
    for recs in by_cls.values():
        if n := sum(r.gbps is not None for r in recs):
            suspects = _slow_ends(recs, "gbps", lambda mine, rest: mine <= (1 - policy.min_gap) * rest)
            for r in recs:
                med, mad, count = _peers(recs, r, "gbps", suspects)
                if r.gbps is not None and med > 0:
                    r.bw_ratio, r.bw_peers = r.gbps / med, (med, count, n)
                    r.slow_bw = r.bw_ratio <= 1 - policy.min_gap and _outlier(med - r.gbps, mad, count, policy.z)
        if n := sum(r.latency_us is not None for r in recs):
            suspects = _slow_ends(recs, "latency_us", lambda mine, rest: mine >= (1 + policy.latency_gap) * rest)
            for r in recs:
                med, mad, count = _peers(recs, r, "latency_us", suspects)
                if r.latency_us is not None and med > 0:
                    r.lat_ratio, r.lat_peers = r.latency_us / med, (med, count, n)
                    r.slow_lat = (r.lat_ratio >= 1 + policy.latency_gap
                                  and _outlier(r.latency_us - med, mad, count, policy.z))


SMALL_CLASS = 2000


def _slow_ends(recs: list[_Link], attr: str, worse: Any) -> set[int]:
    """Endpoints whose links' median is worse than the median of the links not touching them.

    In a small fleet one slow endpoint touches a large share of all links (half of them with 4
    endpoints): it drags the class median and MAD along and hides itself. Such endpoints are
    left out of the yardstick the links are judged against.
    """
    if len(recs) > SMALL_CLASS:  # one endpoint cannot move the median of a large class
        return set()
    ends = {e for x in recs for e in (x.src, x.dst)}
    out = set()
    for e in ends:
        mine = [getattr(x, attr) for x in recs if e in (x.src, x.dst) and getattr(x, attr) is not None]
        rest = [getattr(x, attr) for x in recs if e not in (x.src, x.dst) and getattr(x, attr) is not None]
        if len(mine) >= 2 and len(rest) >= 2 and worse(statistics.median(mine), statistics.median(rest)):
            out.add(e)
    return out if len(out) * 2 < len(ends) else set()  # a majority cannot all be the odd ones out


def _peers(recs: list[_Link], r: _Link, attr: str, suspects: set[int]) -> tuple[float, float, int]:
    """(median, MAD, count) of the comparable links a link is judged against: its class, less the
    links of suspect endpoints (when enough remain)."""
    values = [getattr(x, attr) for x in recs if getattr(x, attr) is not None]
    if suspects:
        clean = [getattr(x, attr) for x in recs
                 if getattr(x, attr) is not None and x.src not in suspects and x.dst not in suspects]
        if len(clean) >= 2:
            values = clean
    if not values:
        return 0.0, 0.0, 0
    med, mad = _robust(values)
    return med, mad, len(values)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Blame:
    """One endpoint blamed for one kind of problem in one direction on one path."""

    verdict: Verdict
    direction: str
    """"sends", "receives", or "both" (an unreachable endpoint fails both ways at once)."""
    path: str
    bad: list[_Link]
    total: int


def _ratio_text(recs: list[_Link]) -> str:
    parts = []
    bw = [r.bw_ratio for r in recs if r.slow_bw and r.bw_ratio is not None]
    if bw:
        parts.append(f"bandwidth {statistics.median(bw):.2f}x the median")
    lat = [r.lat_ratio for r in recs if r.slow_lat and r.lat_ratio is not None]
    if lat:
        parts.append(f"latency {statistics.median(lat):.2f}x the median")
    return ", ".join(parts)


def _share(bad: list[_Link], judged: list[_Link], partner: str, policy: LinkPolicy) -> bool:
    # >= 2 partners: with one, a bad link and a bad endpoint look the same and the link is the
    # cheaper explanation
    partners = {getattr(r, partner) for r in bad}
    return len(partners) >= 2 and len(bad) >= policy.endpoint_share * len(judged)


def _blame(links: dict[tuple[int, int], _Link], n: int, policy: LinkPolicy) -> dict[int, list[_Blame]]:
    """Which endpoints own their links' problems: most of one direction on one path, over >= 2 partners.

    Counted per path (intra-host / inter-host) because a fault lives in one piece of hardware: a
    throttled NIC slows every inter-host link of its endpoint and none of its NVLink links, and
    on an 8-GPU host those 7 clean NVLink links would otherwise outvote the slow ones.
    """
    mine: dict[tuple[int, str], list[_Link]] = defaultdict(list)
    for rec in links.values():
        mine[(rec.src, rec.path)].append(rec)
        mine[(rec.dst, rec.path)].append(rec)
    blamed: dict[int, list[_Blame]] = defaultdict(list)
    for (e, path), every in sorted(mine.items()):
        dead = [r for r in every if r.errored]
        partners = {r.dst if r.src == e else r.src for r in dead}
        if len(partners) >= 2 and len(dead) >= policy.endpoint_share * len(every):
            blamed[e].append(_Blame(verdict=Verdict.ERROR, direction="both", path=path, bad=dead, total=len(every)))
        for direction, peer in (("sends", "dst"), ("receives", "src")):
            recs = [r for r in every if (r.src if direction == "sends" else r.dst) == e]
            checked = [r for r in recs if r.attempts > len(r.errors) or r.wrong]
            bad = [r for r in checked if r.wrong]
            if _share(bad, checked, peer, policy):
                blamed[e].append(_Blame(verdict=Verdict.WRONG, direction=direction, path=path, bad=bad,
                                        total=len(checked)))
            measured = [r for r in recs if not r.errored]
            bad = [r for r in measured if r.slow]
            if _share(bad, measured, peer, policy):
                blamed[e].append(_Blame(verdict=Verdict.SLOW, direction=direction, path=path, bad=bad,
                                        total=len(measured)))
    return _explained_away(blamed, links, policy)


def _explained_away(blamed: dict[int, list[_Blame]], links: dict[tuple[int, int], _Link],
                    policy: LinkPolicy) -> dict[int, list[_Blame]]:
    """Drop a blame whose evidence is mostly links to a *more* guilty endpoint.

    With 4 endpoints, a throttled endpoint X slows a third of every other endpoint's links; one
    noisy link more and an innocent peer crosses the share threshold too. A link counts against
    an endpoint only when its other end is not blamed more strongly for the same fault.
    """
    strength = {(e, b.verdict): max(len(x.bad) / max(1, x.total) for x in bs if x.verdict == b.verdict)
                for e, bs in blamed.items() for b in bs}
    out: dict[int, list[_Blame]] = defaultdict(list)
    for e, bs in blamed.items():
        for b in bs:
            if b.verdict is Verdict.ERROR:
                out[e].append(b)
                continue
            mine = strength[(e, b.verdict)]

            keep = [r for r in b.bad if strength.get((r.dst if r.src == e else r.src, b.verdict), 0.0) <= mine]
            dropped = len(b.bad) - len(keep)
            judged = b.total - dropped
            peer = "dst" if b.direction == "sends" else "src"
            if _share(keep, [None] * judged, peer, policy):  # type: ignore[list-item]
                out[e].append(_Blame(verdict=b.verdict, direction=b.direction, path=b.path, bad=keep, total=judged))
    return out


def _who(e: int, hosts: Mapping[int, str]) -> str:
    return f"endpoint {e} ({hosts[e]})" if e in hosts else f"endpoint {e}"


def _endpoint_reason(e: int, verdict: Verdict, blames: list[_Blame], hosts: Mapping[int, str],
                     paths: set[str]) -> str:
    """One line for all of an endpoint's blames of one verdict (per direction; paths named only when
    the problem is on some of the endpoint's paths, not all)."""
    by_dir: dict[str, list[_Blame]] = defaultdict(list)
    for b in blames:
        by_dir[b.direction].append(b)
    parts = []
    for direction, bs in by_dir.items():
        bad = [r for b in bs for r in b.bad]
        total = sum(b.total for b in bs)
        on = "" if {b.path for b in bs} == paths else f"{' and '.join(sorted(b.path for b in bs))} "
        counts = f"{len(bad)} of {total} {on}links"
        if verdict is Verdict.ERROR:
            parts.append(f"could not be measured on {counts} (first error: {bad[0].errors[0]})")
        elif verdict is Verdict.WRONG:
            parts.append(f"corrupts what it {direction[:-1]}s on {counts} "
                         f"({sum(r.bad_bytes for r in bad)} corrupted bytes)")
        else:
            parts.append(f"{direction} at {_ratio_text(bad)} on {counts}")
    text = f"{_who(e, hosts)} " + " and ".join(parts)
    return text + {Verdict.ERROR: ": check that it is up and reachable", Verdict.WRONG: ": drain it, its peers are clean",
                   Verdict.SLOW: "; its peers are fine"}[verdict]


def _yardstick(peers: tuple[float, int, int], unit: str, cls: str) -> str:
    """The links a ratio is against, as a reason quotes them."""
    med, count, of = peers
    less = f" (the class's {of} less those of its slow endpoints)" if count < of else ""
    return f"the median {med:.3g} {unit} of {count} {cls} links{less}"


def _link_reasons(rec: _Link, blamed: dict[int, list[_Blame]], hosts: Mapping[int, str]) -> list[tuple[Verdict, str]]:
    """(verdict, one line) per problem on the link, blaming an endpoint where it owns the problem."""
    s, d = rec.src, rec.dst
    name = f"{s}->{d}"

    def tail(verdict: Verdict, link_text: str) -> str:
        # the sender owns the problems it has sending, the receiver those it has receiving
        owners = []
        for e, direction in ((s, "sends"), (d, "receives")):
            if any(b.verdict is verdict and b.path == rec.path and b.direction in (direction, "both")
                   for b in blamed.get(e, [])):
                what = {Verdict.WRONG: f"corrupts what it {direction[:-1]}s", Verdict.ERROR: "is unreachable",
                        Verdict.SLOW: f"is slow to {direction[:-1]}"}[verdict]
                owners.append(f"{_who(e, hosts)} {what}")
        return f"because {' and '.join(owners)}" if owners else link_text

    out: list[tuple[Verdict, str]] = []
    if rec.wrong:
        frac = f"{rec.bad_bytes} of {rec.total_bytes}" if rec.total_bytes else f"{rec.bad_bytes}"
        out.append((Verdict.WRONG, f"wrong: {frac} payload bytes corrupted on {name}, " + tail(
            Verdict.WRONG, f"while {_who(s, hosts)} and {_who(d, hosts)} are clean on their other links: "
                           f"suspect the link between them (cable, port, switch)")))
    if rec.errored:
        out.append((Verdict.ERROR, f"error: {name} could not be measured ({rec.errors[0]}), "
                    + tail(Verdict.ERROR, "its endpoints measured fine on their other links")))
    if rec.slow:
        parts = []
        if rec.slow_bw and rec.bw_ratio is not None and rec.gbps is not None:
            parts.append(f"bandwidth {rec.gbps:.3g} GB/s is {rec.bw_ratio:.2f}x " + _yardstick(rec.bw_peers, "GB/s",
                                                                                             rec.cls))
        if rec.slow_lat and rec.lat_ratio is not None and rec.latency_us is not None:
            parts.append(f"latency {rec.latency_us:.3g} us is {rec.lat_ratio:.2f}x "
                         + _yardstick(rec.lat_peers, "us", rec.cls))
        out.append((Verdict.SLOW, f"slow: {name} " + " and ".join(parts) + ", " + tail(
            Verdict.SLOW, f"while {_who(s, hosts)} and {_who(d, hosts)} are fine on their other links: "
                          f"suspect the link between them")))
    return out


def judge_links(measurements: Iterable[LinkMeasurement], n: int, hosts: Mapping[int, str],
                policy: LinkPolicy = LinkPolicy(), *,
                placement: Mapping[int, tuple[str, ...]] | None = None) -> LinkReport:
    """Judge every measured direction of every link and localize each problem to a link or an endpoint.

    Links are compared only with comparable links: intra-host with intra-host, inter-host with
    inter-host; `placement` (endpoint -> its groups outermost first, e.g. the inferred or declared
    (rack, host)) further splits inter-host links by how far apart their ends sit, so cross-rack
    latency is not read as slowness. An endpoint is blamed (and its peers cleared) when at least
    `policy.endpoint_share` of its links in one direction, over >= 2 partners, show the problem.
    An endpoint without any measured link (n >= 2) is an `error`: never a silent pass.
    """
    links = _merge(measurements, n)
    _classify(links, hosts, placement)
    _judge_speed(links, policy)
    blamed = _blame(links, n, policy)

    verdicts = []
    for key in sorted(links):
        rec = links[key]
        problems = _link_reasons(rec, blamed, hosts)
        verdict = Verdict.worst([v for v, _ in problems])
        problems.sort(key=lambda p: -SEVERITY[p[0]])
        verdicts.append(LinkJudgement(src=rec.src, dst=rec.dst, verdict=verdict,
                                      reason="; ".join(text for _, text in problems),
                                      latency_us=rec.latency_us, gbps=rec.gbps, bad_bytes=rec.bad_bytes))

    touched = {e for key in links for e in key}
    paths: dict[int, set[str]] = defaultdict(set)
    for rec in links.values():
        paths[rec.src].add(rec.path)
        paths[rec.dst].add(rec.path)
    endpoints = []
    for e in range(n):
        by_verdict: dict[Verdict, list[_Blame]] = defaultdict(list)
        for b in blamed.get(e, []):
            by_verdict[b.verdict].append(b)
        if by_verdict:
            order = sorted(by_verdict, key=lambda v: -SEVERITY[v])
            endpoints.append(EndpointVerdict(endpoint=e, verdict=order[0], reason="; ".join(
                _endpoint_reason(e, v, by_verdict[v], hosts, paths[e]) for v in order)))
        elif e not in touched and n >= 2:
            endpoints.append(EndpointVerdict(endpoint=e, verdict=Verdict.ERROR,
                                             reason=f"{_who(e, hosts)}: no link to or from it was measured"))
        else:
            endpoints.append(EndpointVerdict(endpoint=e, verdict=Verdict.PASS, reason=""))

    latency: Matrix = [[None] * n for _ in range(n)]
    bandwidth: Matrix = [[None] * n for _ in range(n)]
    errors = [[0] * n for _ in range(n)]
    for (s, d), rec in links.items():
        latency[s][d], bandwidth[s][d], errors[s][d] = rec.latency_us, rec.gbps, rec.bad_bytes
    return LinkReport(links=verdicts, endpoints=endpoints, latency=latency, bandwidth=bandwidth, errors=errors)
