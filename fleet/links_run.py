"""From the links probe's per-rank records to link verdicts, endpoint judgements and topology.

Each direction src -> dst is measured by both ends: the sender times it (latency, bandwidth),
the receiver checks the payload bits. They are merged here and judged over the whole matrix
by fleet.judge.links; a corrupting or slow *endpoint* becomes a Judgement on that device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from ..results import DeviceInfo, Judgement, LinksSummary, ProbeResult, Verdict
from . import topology as tp
from .judge import links as la


def measurements(results: list[ProbeResult]) -> list[la.LinkMeasurement]:
    """Merge the sender's and the receiver's halves of every measured direction (repeats kept)."""
    halves: dict[tuple[int, int], list] = defaultdict(list)
    for r in results:
        for x in r.links:
            halves[(x.src, x.dst)].append(x)
    out = []
    for (src, dst), xs in sorted(halves.items()):
        send = [x for x in xs if x.measured_by == src]
        recv = [x for x in xs if x.measured_by == dst]
        for i in range(max(len(send), len(recv))):
            s = send[i] if i < len(send) else None
            v = recv[i] if i < len(recv) else None
            errors = "; ".join(e for e in ((s.error if s else "missing sender record"),
                                           (v.error if v else "missing receiver record")) if e)
            out.append(la.LinkMeasurement(src=src, dst=dst, latency_us=s.latency_us if s else None,
                                          gbps=s.gbps if s else None, bad_bytes=v.bad_bytes if v else 0,
                                          total_bytes=v.total_bytes if v else 0, error=errors))
    return out


# Virtual CPU devices talk through the kernel's loopback or veth on shared cores: a round trip
# waits for the scheduler (15x swings seen between two clean runs), and bandwidth spreads by half
# its median. There, only a halved bandwidth or a 50x latency counts, and the spread-based
# outlier test is relaxed to match; GPUs keep the default policy.
CPU_POLICY = la.LinkPolicy(min_gap=0.5, latency_gap=49.0, z=1.0)


def _cpu_placement(results: list[ProbeResult], hosts: Mapping[int, str]) -> dict[int, tuple[str, ...]] | None:
    """Virtual CPU devices: (host, the cores the worker is pinned to). Two workers on one core
    ping-pong through context switches and are compared only with pairs placed alike."""
    out: dict[int, tuple[str, ...]] = {}
    for r in results:
        cores = r.settings.get("cpu_affinity")
        if r.device.startswith("cpu") and cores:
            out[r.rank] = (hosts.get(r.rank, r.host), "cores " + ",".join(map(str, cores)))
    return out if len(out) == len(hosts) else None


def policy_for(devs: Mapping[int, DeviceInfo]) -> la.LinkPolicy:
    """The link thresholds for these devices (virtual CPU devices share cores: looser)."""
    return CPU_POLICY if all(d.kind.value == "cpu" for d in devs.values()) else la.LinkPolicy()


def analyze(results: list[ProbeResult], devs: Mapping[int, DeviceInfo],
            declared: Mapping[int, tuple[str, ...]] | None = None,
            policy: la.LinkPolicy | None = None) -> tuple[LinksSummary, list[Judgement]] | None:
    """None when the run measured no links."""
    policy = policy or policy_for(devs)
    link_results = [r for r in results if r.probe == "links" and r.links]
    if not link_results:
        return None
    n = len(devs)
    hosts = {rank: d.host for rank, d in devs.items()}
    meas = measurements(link_results)
    first = la.judge_links(meas, n, hosts, policy)
    topo = tp.infer_topology(first.latency)
    placement = _cpu_placement(link_results, hosts) or (
        {i: tuple(str(g) for g in grp) for i, grp in enumerate(topo.groups)} if topo.levels else None)
    report = la.judge_links(meas, n, hosts, policy, placement=placement) if placement else first
    labels = {rank: f"{d.host} {d.label}" for rank, d in devs.items()}
    params = link_results[0].params
    summary = LinksSummary(
        pairing=str(params.get("pairing", "")), rounds=int(params.get("rounds", 0)),
        links=report.links,
        latency_us=report.latency, gbps=report.bandwidth, bad_bytes=report.errors,
        topology_levels=list(topo.levels), topology_groups=[list(g) for g in topo.groups],
        topology_text=tp.render_topology(topo, labels) if topo.levels else "",
        disagreements=tp.compare_declared(topo, declared) if declared else [],
    )
    judgements = [Judgement(rank=e.endpoint, probe="links", case="pairs", verdict=e.verdict, reason=e.reason)
                  for e in report.endpoints if e.verdict is not Verdict.PASS]
    return summary, judgements
