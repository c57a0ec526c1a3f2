"""Link judgement and topology inference on synthetic fleets: faults localized, noise never flagged."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from chipcheck.fleet.judge.links import LinkMeasurement, LinkPolicy, LinkReport, judge_links
from chipcheck.fleet.topology import (
    InferredTopology,
    average_linkage,
    compare_declared,
    infer_topology,
    render_topology,
)
from chipcheck.probes import pairing
from chipcheck.results import (
    DeviceSummary,
    LinksSummary,
    LinkSummary,
    ReportExtras,
    RunSummary,
    Topology,
    Verdict,
)

N = 16
HOSTS = {e: f"node{e // 4}" for e in range(N)}  # 4 hosts x 4 devices
RACK = {e: e // 8 for e in range(N)}  # 2 racks of 2 hosts
LABELS = {e: f"{HOSTS[e]} cuda:{e % 4}" for e in range(N)}


def fleet(seed: int = 0, noise: float = 0.02, *, slow_endpoint: int | None = None,
          slow_link: tuple[int, int] | None = None, corrupt_sender: int | None = None,
          corrupt_link: tuple[int, int] | None = None, dead: int | None = None,
          skip: set[tuple[int, int]] | None = None) -> list[LinkMeasurement]:
    """Every direction of every pair: intra-host ~5 us / 300 GB/s, in-rack ~20 us, cross-rack ~80 us / 50 GB/s."""
    rng = random.Random(seed)
    out = []
    for s in range(N):
        for d in range(N):
            if s == d or (skip and (s, d) in skip):
                continue
            if HOSTS[s] == HOSTS[d]:
                lat, bw = 5.0, 300.0
            elif RACK[s] == RACK[d]:
                lat, bw = 20.0, 50.0
            else:
                lat, bw = 80.0, 50.0
            lat *= 1 + rng.gauss(0, noise)
            bw *= 1 + rng.gauss(0, noise)
            if slow_endpoint in (s, d) or slow_link == (s, d):
                bw *= 0.4
            bad = 0
            if corrupt_sender == s:
                bad = 7
            if corrupt_link == (s, d):
                bad = 3
            error = "timeout after 30 s" if dead in (s, d) else ""
            out.append(LinkMeasurement(src=s, dst=d, latency_us=None if error else lat, gbps=None if error else bw,
                                       bad_bytes=bad, total_bytes=1 << 20, error=error))
    return out


def failing(report: LinkReport) -> tuple[dict[int, Verdict], dict[tuple[int, int], Verdict]]:
    eps = {e.endpoint: e.verdict for e in report.endpoints if e.verdict is not Verdict.PASS}
    links = {(lv.src, lv.dst): lv.verdict for lv in report.links if lv.verdict is not Verdict.PASS}
    return eps, links


# ----------------------------------------------------------------------------- judgement


def test_clean_fleet_passes_and_fills_the_matrices() -> None:
    r = judge_links(fleet(), N, HOSTS)
    assert failing(r) == ({}, {})
    assert len(r.links) == N * (N - 1) and all(lv.reason == "" for lv in r.links)
    assert r.latency[0][0] is None and r.latency[0][1] == pytest.approx(5, rel=0.1)
    assert r.bandwidth[0][15] == pytest.approx(50, rel=0.1) and r.errors[0][1] == 0


@pytest.mark.parametrize("seed", range(200))
def test_noise_is_never_flagged(seed: int) -> None:
    assert failing(judge_links(fleet(seed), N, HOSTS)) == ({}, {})


def test_rate_limited_endpoint_is_slow_and_its_peers_are_not() -> None:
    r = judge_links(fleet(slow_endpoint=5), N, HOSTS)
    eps, links = failing(r)
    assert eps == {5: Verdict.SLOW}
    assert set(links) == {(s, d) for s in range(N) for d in range(N) if s != d and 5 in (s, d)}
    assert set(links.values()) == {Verdict.SLOW}
    reason = next(e.reason for e in r.endpoints if e.endpoint == 5)
    assert "endpoint 5 (node1)" in reason and "15 of 15 links" in reason and "0.4" in reason
    for lv in r.links:
        if 5 in (lv.src, lv.dst):
            assert "because endpoint 5 (node1) is slow" in lv.reason and "\n" not in lv.reason
            # the median quoted is the one the ratio is against: the class less the slow endpoint's links
            # (the class's own median, slow links and all, made "0.24 GB/s is 0.17x the median 0.67")
            m = re.search(r"bandwidth ([\d.]+) GB/s is ([\d.]+)x the median ([\d.]+) GB/s of (\d+) (\S+) links \(the "
                          r"class's (\d+) less those of its slow endpoints\)", lv.reason)
            assert m, lv.reason
            assert abs(float(m[1]) / float(m[3]) - float(m[2])) < 0.01 and int(m[4]) < int(m[6])


def test_single_slow_link_is_the_link_not_its_endpoints() -> None:
    r = judge_links(fleet(slow_link=(2, 9)), N, HOSTS)
    eps, links = failing(r)
    assert eps == {} and links == {(2, 9): Verdict.SLOW}
    reason = next(lv.reason for lv in r.links if (lv.src, lv.dst) == (2, 9))
    assert re.search(r"bandwidth [\d.]+ GB/s is 0\.[34]\dx the median [\d.]+ GB/s", reason)  # bytes, not bits
    assert "inter-host" in reason and "endpoint 2 (node0)" in reason and "endpoint 9 (node2)" in reason
    assert "suspect the link" in reason


def test_slow_intra_host_link_is_judged_against_intra_host_links() -> None:
    # 120 GB/s over NVLink is slow even though it beats every network link
    r = judge_links(fleet(slow_link=(0, 1)), N, HOSTS)
    assert failing(r) == ({}, {(0, 1): Verdict.SLOW})
    assert "intra-host" in next(lv.reason for lv in r.links if (lv.src, lv.dst) == (0, 1))


def test_high_latency_link_is_slow() -> None:
    ms = [m if (m.src, m.dst) != (4, 8) else
          LinkMeasurement(src=4, dst=8, latency_us=400.0, gbps=m.gbps, total_bytes=m.total_bytes) for m in fleet()]
    r = judge_links(ms, N, HOSTS)
    assert failing(r) == ({}, {(4, 8): Verdict.SLOW})
    assert "latency 400 us" in next(lv.reason for lv in r.links if (lv.src, lv.dst) == (4, 8))


def test_corrupting_sender_is_wrong_and_its_peers_are_clean() -> None:
    r = judge_links(fleet(corrupt_sender=3), N, HOSTS)
    eps, links = failing(r)
    assert eps == {3: Verdict.WRONG}
    assert set(links) == {(3, d) for d in range(N) if d != 3} and set(links.values()) == {Verdict.WRONG}
    reason = next(e.reason for e in r.endpoints if e.endpoint == 3)
    assert "corrupts what it sends on 15 of 15 links" in reason
    assert all("because endpoint 3 (node0) corrupts what it sends" in lv.reason for lv in r.links if lv.src == 3)
    assert r.errors[3][7] == 7 and r.errors[7][3] == 0


def test_corrupting_receiver_is_named_for_what_it_receives() -> None:
    ms = [LinkMeasurement(src=m.src, dst=m.dst, latency_us=m.latency_us, gbps=m.gbps, total_bytes=m.total_bytes,
                          bad_bytes=5 if m.dst == 12 and m.src != 0 else 0) for m in fleet()]
    r = judge_links(ms, N, HOSTS)
    eps, links = failing(r)
    assert eps == {12: Verdict.WRONG} and len(links) == 14
    assert "corrupts what it receives on 14 of 15 links" in next(e.reason for e in r.endpoints if e.endpoint == 12)


def test_single_corrupting_link_is_wrong_and_its_endpoints_pass() -> None:
    r = judge_links(fleet(corrupt_link=(3, 12)), N, HOSTS)
    assert failing(r) == ({}, {(3, 12): Verdict.WRONG})
    reason = next(lv.reason for lv in r.links if (lv.src, lv.dst) == (3, 12))
    assert "3 of 1048576 payload bytes" in reason and "suspect the link between them" in reason


def test_link_corrupting_both_ways_is_still_the_link() -> None:
    ms = [LinkMeasurement(src=m.src, dst=m.dst, latency_us=m.latency_us, gbps=m.gbps, total_bytes=m.total_bytes,
                          bad_bytes=1 if {m.src, m.dst} == {6, 10} else 0) for m in fleet()]
    assert failing(judge_links(ms, N, HOSTS)) == ({}, {(6, 10): Verdict.WRONG, (10, 6): Verdict.WRONG})


def test_errored_link_is_error_and_dead_endpoint_is_error() -> None:
    ms = [LinkMeasurement(src=m.src, dst=m.dst, latency_us=None, gbps=None, error="connection reset")
          if (m.src, m.dst) == (1, 14) else m for m in fleet()]
    r = judge_links(ms, N, HOSTS)
    assert failing(r) == ({}, {(1, 14): Verdict.ERROR})
    assert "connection reset" in next(lv.reason for lv in r.links if (lv.src, lv.dst) == (1, 14))

    r = judge_links(fleet(dead=9), N, HOSTS)
    eps, links = failing(r)
    assert eps == {9: Verdict.ERROR} and len(links) == 30 and set(links.values()) == {Verdict.ERROR}
    assert "could not be measured on 30 of 30 links" in next(e.reason for e in r.endpoints if e.endpoint == 9)
    assert all("because endpoint 9 (node2) is unreachable" in lv.reason for lv in r.links if 9 in (lv.src, lv.dst))


def test_unmeasured_endpoint_is_an_error_never_a_pass() -> None:
    r = judge_links([m for m in fleet() if 15 not in (m.src, m.dst)], N, HOSTS)
    eps, links = failing(r)
    assert eps == {15: Verdict.ERROR} and links == {}
    assert r.bandwidth[15][0] is None


def test_retries_keep_the_best_numbers_and_every_corrupted_byte() -> None:
    ms = [LinkMeasurement(src=0, dst=1, latency_us=None, gbps=None, error="timeout"),
          LinkMeasurement(src=0, dst=1, latency_us=6.0, gbps=90.0, bad_bytes=2, total_bytes=10),
          LinkMeasurement(src=0, dst=1, latency_us=5.0, gbps=100.0, bad_bytes=0, total_bytes=10),
          LinkMeasurement(src=1, dst=0, latency_us=5.0, gbps=100.0, total_bytes=10)]
    r = judge_links(ms, 2, {0: "a", 1: "a"})
    assert r.bandwidth[0][1] == 100.0 and r.latency[0][1] == 5.0 and r.errors[0][1] == 2
    assert failing(r) == ({}, {(0, 1): Verdict.WRONG})


def test_few_links_use_the_gap_alone() -> None:
    hosts = {0: "a", 1: "b", 2: "c"}

    def m(s: int, d: int, bw: float) -> LinkMeasurement:
        return LinkMeasurement(src=s, dst=d, latency_us=10.0, gbps=bw)

    r = judge_links([m(0, 1, 50), m(1, 0, 51), m(0, 2, 49), m(2, 0, 30)], 3, hosts)
    assert failing(r) == ({}, {(2, 0): Verdict.SLOW})
    r = judge_links([m(0, 1, 50), m(1, 0, 51), m(0, 2, 49), m(2, 0, 40)], 3, hosts)
    assert failing(r) == ({}, {})  # 0.8x: inside the 25% gap


def test_policy_thresholds_are_honoured() -> None:
    r = judge_links(fleet(slow_link=(2, 9)), N, HOSTS, LinkPolicy(min_gap=0.7))
    assert failing(r) == ({}, {})


def test_placement_keeps_far_links_from_reading_as_slow() -> None:
    # 8 hosts; node7 sits in another building (400 us away). Against all inter-host links its links
    # look slow; against the links that cross buildings too, they are not
    n = 32
    hosts = {e: f"node{e // 4}" for e in range(n)}
    rng = random.Random(0)
    ms = []
    for s in range(n):
        for d in range(n):
            if s != d:
                lat = 5.0 if hosts[s] == hosts[d] else 400.0 if 7 in (s // 4, d // 4) else 20.0
                ms.append(LinkMeasurement(src=s, dst=d, latency_us=lat * (1 + rng.gauss(0, 0.02)),
                                          gbps=50 * (1 + rng.gauss(0, 0.02))))
    eps, links = failing(judge_links(ms, n, hosts))
    assert set(eps) == {28, 29, 30, 31} and len(links) == 4 * 28 * 2
    placement = {e: ("b1" if e // 4 == 7 else "b0", hosts[e]) for e in range(n)}
    assert failing(judge_links(ms, n, hosts, placement=placement)) == ({}, {})
    # the inferred topology gives the same placement
    t = infer_topology(judge_links(ms, n, hosts).latency)
    inferred = dict(enumerate(tuple(map(str, g)) for g in t.groups))
    assert failing(judge_links(ms, n, hosts, placement=inferred)) == ({}, {})


def test_throttled_nic_on_an_8_gpu_host_blames_the_endpoint_not_its_nvlink_peers() -> None:
    # two 8-GPU hosts: endpoint 3's NIC is throttled, so its 8 inter-host links are slow and its 7
    # NVLink links are not; per path, 8 of 8 is the endpoint's problem
    hosts = {e: f"node{e // 8}" for e in range(16)}
    rng = random.Random(2)
    ms = [LinkMeasurement(src=s, dst=d, latency_us=5.0 if hosts[s] == hosts[d] else 20.0,
                          gbps=(300.0 if hosts[s] == hosts[d] else 50.0 * (0.4 if 3 in (s, d) else 1.0))
                          * (1 + rng.gauss(0, 0.02)))
          for s in range(16) for d in range(16) if s != d]
    r = judge_links(ms, 16, hosts)
    eps, links = failing(r)
    assert eps == {3: Verdict.SLOW} and len(links) == 16
    assert "on 8 of 8 inter-host links" in next(e.reason for e in r.endpoints if e.endpoint == 3)


def _measure(rounds: list[list[tuple[int, int]]], n: int, hosts: dict[int, str], seed: int, *,
             slow_endpoint: int, slow_link: tuple[int, int], corrupt_sender: int) -> list[LinkMeasurement]:
    rng = random.Random(seed)
    out = []
    for r in rounds:
        for a, b in r:
            for s, d in ((a, b), (b, a)):
                same = hosts[s] == hosts[d]
                bw = (300.0 if same else 50.0) * (1 + rng.gauss(0, 0.02))
                if slow_endpoint in (s, d) or (s, d) == slow_link:
                    bw *= 0.5
                out.append(LinkMeasurement(src=s, dst=d, latency_us=(5.0 if same else 30.0) * (1 + rng.gauss(0, 0.02)),
                                           gbps=bw, bad_bytes=9 if s == corrupt_sender else 0, total_bytes=1 << 20))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_random_pairing_localizes_faults_then_repair_clears_innocent_peers(seed: int) -> None:
    n = 128
    hosts = {e: f"node{e // 8}" for e in range(n)}
    eps = list(range(n))
    rounds = pairing.schedule(eps, hosts, "random:15", seed)
    slow_link = next((a, b) for a, b in rounds[0] if hosts[a] != hosts[b] and 17 not in (a, b) and 40 not in (a, b))
    faults = dict(slow_endpoint=17, slow_link=slow_link, corrupt_sender=40)
    ms = _measure(rounds, n, hosts, seed, **faults)
    eps_bad, links = failing(judge_links(ms, n, hosts))
    assert eps_bad == {17: Verdict.SLOW, 40: Verdict.WRONG}
    assert links[slow_link] is Verdict.SLOW
    assert {k for k in links if 17 not in k and k[0] != 40} == {slow_link}
    # second pass: the lone slow link's ends each meet two known-good partners; both come back clean,
    # so the first pass's verdict (the link, not its ends) stands
    good = set(eps) - {17, 40, *slow_link}
    repair = pairing.repair_rounds([17, 40], [slow_link], good, eps, seed)
    ms2 = _measure(repair, n, hosts, seed + 1, **faults)
    r2 = judge_links(ms + ms2, n, hosts)
    eps_bad2, links2 = failing(r2)
    assert eps_bad2 == eps_bad and links2[slow_link] is Verdict.SLOW


def test_tiny_fleets() -> None:
    assert judge_links([], 0, {}) == LinkReport(links=[], endpoints=[], latency=[], bandwidth=[], errors=[])
    assert judge_links([], 1, {}).endpoints[0].verdict is Verdict.PASS
    t = infer_topology([])
    assert t.groups == [] and t.levels == ()
    assert infer_topology([[None]]).groups == [()]


def test_bad_measurement_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a link"):
        judge_links([LinkMeasurement(src=0, dst=0, latency_us=1.0, gbps=1.0)], 2, {})
    with pytest.raises(ValueError, match="not a link"):
        judge_links([LinkMeasurement(src=0, dst=5, latency_us=1.0, gbps=1.0)], 2, {})


# ----------------------------------------------------------------------------- topology


def test_inferred_topology_matches_hosts_and_racks() -> None:
    for seed in range(20):
        t = infer_topology(judge_links(fleet(seed), N, HOSTS).latency)
        assert t.levels == ("rack", "host")
        assert [g[1] for g in t.groups] == [e // 4 for e in range(N)]
        assert [g[0] for g in t.groups] == [RACK[e] for e in range(N)]
        assert len(t.merge_heights) == N - 1 and t.merge_heights == sorted(t.merge_heights)
        assert 5 < t.cuts[1] < 20 < t.cuts[0] < 80


def test_topology_from_one_direction_and_sparse_pairs() -> None:
    # only half the directions and about 60% of the pairs measured (random pairing): still found
    rng = random.Random(1)
    lat = judge_links(fleet(3), N, HOSTS).latency
    sparse = [[v if (i < j and rng.random() < 0.6) or HOSTS[i] == HOSTS[j] else None for j, v in enumerate(row)]
              for i, row in enumerate(lat)]
    t = infer_topology(sparse)
    assert [g[-1] for g in t.groups] == [e // 4 for e in range(N)]
    assert [g[0] for g in t.groups] == [RACK[e] for e in range(N)]


def test_flat_latency_has_no_levels_and_three_tiers_have_three() -> None:
    t = infer_topology([[None if i == j else 10.0 + (i + j) % 3 * 0.1 for j in range(6)] for i in range(6)])
    assert t.levels == () and t.groups == [()] * 6
    assert "no levels" in render_topology(t, {})

    def place(e: int) -> tuple[int, int, int]:
        return e // 16, e // 8, e // 4

    def lat(i: int, j: int) -> float:
        a, b = place(i), place(j)
        return 5.0 if a == b else 20.0 if a[1] == b[1] else 80.0 if a[0] == b[0] else 500.0

    t = infer_topology([[None if i == j else lat(i, j) for j in range(32)] for i in range(32)])
    assert t.levels == ("building", "rack", "host")
    assert t.groups == [place(e) for e in range(32)]
    assert infer_topology([[None if i == j else lat(i, j) for j in range(32)] for i in range(32)],
                          max_levels=1).levels == ("host",)


def test_never_compared_endpoints_stay_apart() -> None:
    lat: list[list[float | None]] = [[None] * 4 for _ in range(4)]
    lat[0][1] = lat[1][0] = 5.0
    lat[2][3] = 5.0
    t = infer_topology(lat)
    assert t.merge_heights == [5.0, 5.0] and t.levels == ()


def test_average_linkage_matches_scipy_on_complete_matrices() -> None:
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 30):
        pts = rng.random((n, 3))
        d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
        ours = sorted(h for _, _, h in average_linkage(d.copy()))
        theirs = sorted(hierarchy.linkage(squareform(d, checks=False), method="average")[:, 2])
        assert np.allclose(ours, theirs)


def test_render_topology_is_an_indented_tree() -> None:
    t = infer_topology(judge_links(fleet(), N, HOSTS).latency)
    text = render_topology(t, LABELS)
    lines = text.splitlines()
    assert lines[0].startswith("topology from latency: rack") and "16 endpoints" in lines[0]
    assert lines[1] == "  rack 0 (8 endpoints)"
    assert lines[2] == "    host 0: node0 cuda:0, node0 cuda:1, node0 cuda:2, node0 cuda:3"
    assert len(lines) == 1 + 2 + 4


DECLARED = {e: (f"r{RACK[e]}", f"h{e // 4}") for e in range(N)}


def _topology() -> InferredTopology:
    return infer_topology(judge_links(fleet(), N, HOSTS).latency)


def test_declared_topology_that_matches_has_no_disagreement() -> None:
    assert compare_declared(_topology(), DECLARED) == []
    assert compare_declared(_topology(), {e: (f"h{e // 4}",) for e in range(N)}) == []


def test_one_mislabeled_endpoint_is_exactly_one_disagreement() -> None:
    declared = {**DECLARED, 5: ("r0", "h0")}  # really on h1, same rack
    assert compare_declared(_topology(), declared) == [
        "endpoint 5: declared host 'h0' (with 0, 1, 2, 3) but measures with 4, 6, 7 (declared host 'h1')"]


def test_endpoint_mislabeled_across_racks_is_named_at_both_levels() -> None:
    lines = compare_declared(_topology(), {**DECLARED, 5: ("r1", "h2")})
    assert len(lines) == 2 and all(line.startswith("endpoint 5:") for line in lines)
    assert "declared rack 'r1'" in lines[1]


def test_declared_apart_but_measured_together_and_the_reverse() -> None:
    # two hosts declared as one: measured as two separate groups
    lines = compare_declared(_topology(), {e: ("r0" if e < 8 else "r1", "hA" if e < 8 else f"h{e // 4}")
                                           for e in range(N)})
    assert lines == ["declared host 'hA' is measured as 2 separate groups: 0, 1, 2, 3; 4, 5, 6, 7"]
    # one host declared as two
    lines = compare_declared(_topology(), {**DECLARED, **{e: ("r1", "h3b") for e in (14, 15)}})
    assert lines == ["declared hosts 'h3' and 'h3b' are measured as one host: endpoints 12, 13, 14, 15"]


# ----------------------------------------------------------------------------- report shapes


def test_the_reports_link_and_topology_sections() -> None:
    report = judge_links(fleet(slow_link=(2, 9)), N, HOSTS)
    inferred = infer_topology(report.latency)
    judged = LinksSummary(pairing="ring", rounds=1, links=report.links, latency_us=report.latency,
                          gbps=report.bandwidth, bad_bytes=report.errors, topology_levels=list(inferred.levels),
                          topology_groups=[list(g) for g in inferred.groups])
    devices = [DeviceSummary(rank=e, device=f"cuda:{e % 4}", host=HOSTS[e], uuid="", fingerprint="",
                             verdict=Verdict.PASS, probes=[]) for e in range(N)]
    run = RunSummary(run_id="r", verdict=Verdict.PASS, started=0.0, ended=0.0, profile="quick", seed=0,
                     devices=devices, links=judged)
    extras = ReportExtras.from_links(run)
    links, topo = extras.links, extras.topology
    assert len(links) == N * (N - 1) and all(isinstance(x, LinkSummary) for x in links)
    slow = next(x for x in links if x.verdict is Verdict.SLOW)
    assert (slow.src, slow.dst) == ("node0 cuda:2", "node2 cuda:1") and slow.busbw_gbps == report.bandwidth[2][9]
    assert isinstance(topo, Topology) and topo.levels == ("rack", "host")
    assert topo.placement["node1 cuda:1"] == ("rack 0", "host 1")


@pytest.mark.parametrize(("profile", "n", "with_links"), [
    ("quick", 4, False), ("standard", 4, True), ("nightly", 2, True), ("burnin", 4, True), ("standard", 1, False)])
def test_burn_in_and_nightly_runs_sweep_the_links_a_quick_run_leaves_them(profile: str, n: int,
                                                                          with_links: bool) -> None:
    from chipcheck.fleet import devices
    from chipcheck.fleet.runner import RunOptions, plan_probes

    names = [p for p, _ in plan_probes(RunOptions(profile=profile, duration_s=60.0), devices.cpu_devices(n))]
    assert ("links" in names) is with_links and names[-1 if with_links else 0] == ("links" if with_links else "matmul")
