"""Who is `slow`: noise-aware suspects from the run, confirmed by an interleaved retest.

The rule, for every path (live run, reloaded run, ingested sweep):

1. Ratios. Per (fingerprint, probe, case), each device's speed metric over the median of its peers
   (the others of its fingerprint). Per (device, probe): the median over the probe's cases.
2. Noise, measured, not assumed. A probe's noise in this run is the robust spread (1.4826 x MAD)
   of each device's case log ratios around that device's own median, pooled over devices (a
   consistently slow device does not widen it). A probe *speaks* alone only when its noise is
   below half the gap it must detect (`min_gap / 2`); one with one case per device never does.
3. Suspects. A device is a suspect when a speaking probe puts it at or below `1 - min_gap / 2` and at
   least `z` noise widths below 1; or when the evidence of all its probes of one kernel class
   (compute: `gemm`; memory: `copy`), combined with weights cases / noise², does the same. A noisy
   probe (a model step spreading ±12%) thus never makes a suspect on its own, but adds to the evidence.
   A probe that cannot tell its noise (one case per device, as a burn) suspects only a device at or
   below `1 - 3 min_gap` (0.70x): far beyond any noise seen, and a suspect costs a retest, not a verdict.
   A burn that slowed down and stayed down with no NVML reason for it is a GEMM suspect as well
   (fleet.judge.throttle): a device's own timeline cannot tell a throttling chip from a busy host.
   Per dtype too: a GEMM probe's cases grouped by dtype, a device whose GEMMs in one dtype sit below the
   bar and below its other dtypes beyond the noise (`_slow_dtype`) is a GEMM suspect retested in that
   dtype (kernel `gemm.DTYPE`): a chip slow in bf16 alone hides in the median over its cases. A device
   suspected on other evidence is retested in its slowest dtype too, once that one stands `z` widths
   (not `z + 2`) below its others: no retest more, only the right one.
4. Confirmation. Each suspect and one peer of its fingerprint (the median unsuspected one; the
   fastest other one where all are suspects) are retested on the kernel of their class, alone on
   the host, interleaved (probes/retest.py). Round by round the suspect's speed over the peer's is
   a paired ratio; the suspect is `slow` only when the whole 95% interval of that ratio lies below
   `1 - min_gap / 2`. A 10% slower chip (0.91x) is called, noise is not. The reason says the effect
   with its interval.
   Sequential: a retest that neither confirms (interval below `1 - min_gap / 2`) nor clears (interval
   above `1 - min_gap`: no slowdown of the size that matters) is *inconclusive*; that pair is
   retested once more with more rounds (`KERNEL/extended`, probes/retest.py) and judged on all its
   rounds together. A 15% slow chip on a noisy host (0.87x, interval 0.80-0.94 after 12 rounds)
   is then called; a clean one (1.00x, 0.93-1.07) is cleared at once and costs nothing more.
5. A suspect that was never retested (a path without a retest) or that the retest clears is not
   `slow`: the judgement says so, as a note.
6. A kernel that measures what every device of a host shares is not a device's own speed: a CPU
   device's copy bandwidth is its host's memory system (the other cores', the page cache's writeback,
   other tenants'), so `HOST_SHARED` kernels make no suspect on that device kind (nor a drop against
   its own history: fleet.judge.verdicts.own_history). The judgement notes the shortfall instead; a
   slow core still shows in its GEMMs. Nor does a CPU device's retest call it slow when the host was
   busier in its turns than in its peer's by `HOST_BUSY_GAP` of all its CPU time (probes/cpu_load.py):
   the other work slowed it, not its core.
7. Links the same way: a directed link the link analysis calls slow is retested against a passing
   link of its kind (intra- or inter-host), interleaved; it stays slow only when confirmed, with
   the link policy's gap (`1 - min_gap / 2` of fleet.judge.links.LinkPolicy).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ...probes import retest as retest_probe
from ...probes.matmul import ALL_DTYPES
from ...results import Judgement, LinkJudgement, LinksSummary, ProbeResult, Verdict
from . import throttle
from .peers import peer_ratios

RETEST = "retest"
NOTED = "speed"
"""The entry of the speed judge's notes on suspects no retest measured (a kernel whose speed is its host's,
a path that runs no retest): under `retest` they read as what a retest said."""
EXTENDED = retest_probe.EXTENDED
"""The retest stage for inconclusive suspects: its cases are `KERNEL/extended`."""
HOST_SHARED: Mapping[str, frozenset[str]] = {"cpu": frozenset({"copy"})}
"""Per device kind, the retest kernels whose speed belongs to the host, not the device. CPU devices of one
host share one memory system: right after a 700 MB install a healthy core copied at 0.85x its peer
through a whole retest (interval 0.81-0.90), and clean runs since put either core at 0.90-1.06x."""


def host_owned(device_kind: str, kernel: str) -> bool:
    """Is `kernel`'s speed on a `device_kind` device its host's (HOST_SHARED), not the device's?"""
    return kernel in HOST_SHARED.get(device_kind, ())


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeedPolicy:
    min_gap: float = 0.10
    """The relative shortfall against peers that counts as slow (0.10 = 10%)."""
    z: float = 2.0
    """Noise widths below 1 that the evidence must reach to make a suspect."""
    confidence: float = 0.95
    """Of the retest's interval of the paired ratio."""

    @property
    def far(self) -> float:
        """A probe that cannot tell its noise (one case per device) suspects a device this far below."""
        return 1.0 - 3 * self.min_gap

    @property
    def bar(self) -> float:
        """Suspects sit at or below it; a confirmed slow device's whole interval lies below it."""
        return 1.0 - self.min_gap / 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspect:
    """A device the run's measurements put below its peers, to be retested against `peer`."""

    rank: int
    peer: int
    kernel: str
    ratio: float
    """Its combined ratio to its peers over the suspecting evidence."""
    evidence: str
    """Which probes, at which ratios and noise, made it a suspect."""
    shared: str = ""
    """The device kind whose `kernel` is its host's (HOST_SHARED): noted, never retested or called slow."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Evidence:
    probe: str
    ratio: float
    noise: float
    cases: int


def suspects(results: list[ProbeResult], policy: SpeedPolicy, metric_by_probe: dict[str, str],
             kernel_by_probe: dict[str, str]) -> list[Suspect]:
    """Every device whose run puts it below its fingerprint peers beyond the measured noise."""
    logs: dict[str, dict[tuple[int, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    fingerprint: dict[int, str] = {}
    kind: dict[int, str] = {}
    by_case: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in results:
        metric, kernel = metric_by_probe.get(r.probe, ""), kernel_by_probe.get(r.probe, "")
        v = r.metrics.get(metric) if metric and kernel else None
        if r.error is None and v is not None and math.isfinite(v) and v > 0:
            by_case[(r.fingerprint, r.probe, r.case)][r.rank] = v
            fingerprint[r.rank] = r.fingerprint
            kind[r.rank] = r.device.partition(":")[0]
    gemm = kernel_by_probe.get(throttle.BURN) or "gemm"
    # a GEMM probe's cases per dtype as well: a chip slow in one dtype only hides in the probe's median
    typed: dict[str, dict[tuple[int, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for (fp, probe, case), vals in by_case.items():
        if len(vals) < 2:
            continue
        ratio, _ = peer_ratios(np.fromiter(vals.values(), dtype=np.float64, count=len(vals)), np.inf)
        dtype = case_dtype(case) if kernel_by_probe[probe] == gemm else ""
        for rank, q in zip(vals, ratio.tolist(), strict=True):
            logs[probe][(rank, fp)].append(math.log(q))
            if dtype:
                typed[probe][(rank, dtype)].append(math.log(q))
    evidence: dict[tuple[int, str], list[_Evidence]] = defaultdict(list)  # (rank, kernel) -> per probe
    by_dtype: dict[int, dict[str, list[_Evidence]]] = defaultdict(lambda: defaultdict(list))
    for probe, per_dev in logs.items():
        noise = _noise(list(per_dev.values()))
        for (rank, _fp), xs in per_dev.items():
            evidence[(rank, kernel_by_probe[probe])].append(
                _Evidence(probe=probe, ratio=math.exp(statistics.median(xs)), noise=noise, cases=len(xs)))
        for (rank, dtype), xs in typed.get(probe, {}).items():
            by_dtype[rank][dtype].append(
                _Evidence(probe=probe, ratio=math.exp(statistics.median(xs)), noise=noise, cases=len(xs)))
    out = []
    cut = math.log(policy.bar)
    suspected = {key for key, evs in evidence.items() if _suspect(evs, policy, cut)}
    # slow in one dtype needs one below the bar: that cheap test first, over a fleet's devices
    gemm_dtype = {rank: d for rank, per in by_dtype.items()
                  if min(e.ratio for evs in per.values() for e in evs) <= policy.bar
                  and (d := _slow_dtype(per, policy, cut))}
    suspected |= {(rank, gemm) for rank in gemm_dtype}
    # a burn that slowed down with no word from the driver is a suspect too (fleet.judge.throttle)
    throttled: dict[int, throttle.Candidate] = {}
    for c in throttle.unexplained(results, policy.min_gap):
        throttled.setdefault(c.rank, c)
        fingerprint.setdefault(c.rank, c.fingerprint)
    suspected |= {(r, gemm) for r in throttled}
    peers = _peers(evidence, suspected, fingerprint)
    for rank, kernel in sorted(suspected):
        evs = evidence.get((rank, kernel), [])
        peer = peers.get((rank, kernel))
        if peer is None:
            continue  # no other device of its fingerprint: the SKU baseline is the only yardstick
        said = [f"{e.probe} {e.ratio:.2f}x (noise {_pct(e.noise)})" for e in sorted(evs, key=lambda e: e.ratio)]
        thr = throttled.get(rank) if kernel == gemm else None
        if thr is not None:
            said.append(f"{thr.describe()} ({thr.drivers_word()})")
        combined = _combined(evs)[0] if evs else 1.0
        # a GEMM suspect for any reason is retested in its slowest dtype once that one stands below its
        # others by `z` widths: a chip hot enough to slow its bf16 only after the (cold) matmul probe ran
        # was suspected from its later probes, then cleared by a retest in the profile's dtype
        if kernel == gemm and (typed_slow := gemm_dtype.get(rank) or _slow_dtype(by_dtype.get(rank, {}), policy,
                                                                                    cut, widths=policy.z)):
            dtype, dtype_ratio = typed_slow
            combined = min(combined, dtype_ratio)
            said.append(f"{dtype} GEMMs {dtype_ratio:.2f}x, below its other dtypes")
            kernel = f"{gemm}.{dtype}"
        shared = kind.get(rank, "") if host_owned(kind.get(rank, ""), kernel) else ""
        out.append(Suspect(rank=rank, peer=peer, kernel=kernel, ratio=min(combined, thr.ratio) if thr else combined,
                           evidence=", ".join(said), shared=shared))
    return out


DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Short dtype names some probes' cases use (model_step's `bf16`)."""


def case_dtype(case: str) -> str:
    """The dtype a GEMM probe's case runs in, from its name ("bfloat16/exact", burn's "float32", model_step's
    "bf16", model_dp's "dp/bf16"): its first part that names one; "" when none does."""
    for part in case.split("/"):
        if part in DTYPE_NAMES or part in ALL_DTYPES:
            return DTYPE_NAMES.get(part, part)
    return ""


def _slow_dtype(per_dtype: Mapping[str, list[_Evidence]], policy: SpeedPolicy, cut: float, *,
                widths: float | None = None) -> tuple[str, float] | None:
    """The dtype a device's GEMMs are slow in when they are slow in it and not in its other dtypes (a
    chip slow everywhere is the plain GEMM retest's): the slowest such and its ratio, else None. Any of
    matmul's dtypes (`case_dtype`'s) can be retested (probes/retest.py runs matmul's kernel for it).

    Slow in a dtype: its cases (two at least), weighted by their probes' measured noise, put it below
    the bar and below the device's other dtypes by `z + 2` noise widths. Two more widths than a whole
    probe needs: each device's three or four dtypes are that many more comparisons, and the noise
    measured from a few cases per device runs low. On simulated clean runs of 4 devices in 3 dtypes
    with 2-15% noise between cases, `z` made a dtype suspect in one run of four and `z + 2` in 1 to 8
    of 200 (each costs a retest, which clears it); a 0.8x bf16 chip is still found at 2% noise every
    time, at 5% in half the runs, a 0.6x one at 10% in two of three (tests/test_speed_judge.py)."""
    widths = policy.z + 2 if widths is None else widths
    found: dict[str, float] = {}
    for d, evs in per_dtype.items():
        others = [e for o, xs in per_dtype.items() if o != d for e in xs]
        if not others or sum(e.cases for e in evs) < 2:
            continue
        (mine, w_mine), (rest, w_rest) = _combined(evs), _combined(others)
        if math.log(mine) <= cut and math.log(mine) - math.log(rest) <= -widths * math.hypot(w_mine, w_rest):
            found[d] = mine
    return min(found.items(), key=lambda x: (x[1], x[0])) if found else None


def _pct(noise: float) -> str:
    return "unknown" if math.isinf(noise) else f"{noise:.0%}"


def _noise(per_device: list[list[float]]) -> float:
    """A probe's noise in this run: the robust spread of each device's case log ratios around that
    device's own median, pooled. A consistently slow device does not widen it (its cases agree);
    a probe with one case per device cannot tell its noise (infinite: it never speaks alone)."""
    # Deviations from a median of k values are narrower than the noise by about sqrt((k-1)/k).
    dev = [(x - statistics.median(xs)) * math.sqrt(len(xs) / (len(xs) - 1))
           for xs in per_device if len(xs) > 1 for x in xs]
    if not dev:
        return math.inf
    return max(1.4826 * statistics.median(abs(d) for d in dev), 1e-3)


def _combined(evs: list[_Evidence]) -> tuple[float, float]:
    """Inverse-variance weighted mean log ratio over probes (weight cases / noise²), and its width."""
    w = [e.cases / e.noise**2 for e in evs]
    if sum(w) == 0:  # no probe knows its noise (one case per device each): no evidence at all
        return 1.0, math.inf
    mean = sum(wi * math.log(e.ratio) for wi, e in zip(w, evs, strict=True)) / sum(w)
    return math.exp(mean), 1.0 / math.sqrt(sum(w))


def _suspect(evs: list[_Evidence], policy: SpeedPolicy, cut: float) -> bool:
    for e in evs:
        if math.isinf(e.noise) and e.ratio <= policy.far:
            return True  # noise unknown (one case per device: a burn), but far beyond any seen
        if e.noise < policy.min_gap / 2 and math.log(e.ratio) <= cut and -math.log(e.ratio) >= policy.z * e.noise:
            return True
    ratio, width = _combined(evs)
    return math.log(ratio) <= cut and -math.log(ratio) >= policy.z * width


def _peers(evidence: dict[tuple[int, str], list[_Evidence]], suspected: set[tuple[int, str]],
           fingerprint: dict[int, str]) -> dict[tuple[int, str], int]:
    """Per suspect (rank, kernel): the device it is retested against. The median-speed device of its
    fingerprint not itself suspected on the kernel; where every device of the group is a suspect (two
    devices on a busy host: one slow, the other's burn stepped down when the first began beside it),
    the fastest other one: the retest is a paired comparison, so a slow peer can clear a suspect
    (a miss) but never make a clean one slow."""
    speeds: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for (r, k), evs in evidence.items():
        if r in fingerprint:
            speeds[(k, fingerprint[r])].append((_combined(evs)[0], r))
    median_clean: dict[tuple[str, str], int] = {}  # one pass per group, however many suspects it has
    for (k, fp), group in speeds.items():
        group.sort()
        if clean := [r for _, r in group if (r, k) not in suspected]:
            median_clean[(k, fp)] = clean[(len(clean) - 1) // 2]
    out = {}
    for rank, kernel in suspected:
        key = (kernel, fingerprint.get(rank, ""))
        if key in median_clean:
            out[(rank, kernel)] = median_clean[key]
        elif others := [r for _, r in speeds.get(key, []) if r != rank]:
            out[(rank, kernel)] = others[-1]
    return out


def retest_options(found: list[Suspect]) -> dict[str, str]:
    """The retest probe's options: `retest_<kernel>` = "SUSPECT:PEER,..." (probes/retest.py). Two
    suspects retested against each other are one pair: its turns answer for both."""
    pairs: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, frozenset[int]]] = set()
    for s in found:
        if not s.shared and (s.kernel, frozenset((s.rank, s.peer))) not in seen:
            seen.add((s.kernel, frozenset((s.rank, s.peer))))
            pairs[f"retest_{s.kernel}"].append(f"{s.rank}:{s.peer}")
    return {k: ",".join(v) for k, v in pairs.items()}


def retest_cases(options: dict[str, str]) -> list[str]:
    """The retest probe's cases for these options: one per kernel, `/extended` in the second stage."""
    stage = options.get("retest_stage", "")
    return [k.removeprefix("retest_") + (f"/{stage}" if stage else "")
            for k in options if k.startswith("retest_") and k != "retest_stage"]


HOST_BUSY_GAP = 0.10
"""A CPU suspect is not called slow when, in its retest turns, the host was this much busier (a share of all
its CPU time) than in its peer's, or other processes took this much more of its own cores than of its
peer's: that work slowed it, in ways its CPU time cannot see (probes/cpu_load.py)."""


def _retest_param(results: list[ProbeResult], key: str) -> dict[tuple[int, str], float]:
    """(rank, case) -> a figure of that rank's retest turns (CPU devices: `host_busy_share`, how busy the
    host was; `foreign_share`, how much of its own cores other processes took)."""
    return {(r.rank, r.case): float(r.params[key]) for r in results
            if r.probe == RETEST and r.error is None and key in r.params}


def _in_turns(figure: dict[tuple[int, str], float], rank: int, kernel: str) -> float:
    """A rank's figure over its retest turns on `kernel`, first stage or extended (the larger)."""
    return max(figure.get((rank, kernel), 0.0), figure.get((rank, f"{kernel}/{EXTENDED}"), 0.0))


def _turns(results: list[ProbeResult]) -> dict[tuple[int, str], list[float]]:
    """(rank, case) -> that retest case's turn times, for every retest case that ran."""
    return {(r.rank, r.case): r.params.get("turn_s") or [] for r in results if r.probe == RETEST and r.error is None}


def _paired(turns: dict[tuple[int, str], list[float]], s: Suspect, stage: str = "") -> list[float]:
    """The suspect's per-round ratios (peer time / suspect time) in one stage; [] when it has none."""
    case = f"{s.kernel}/{stage}" if stage else s.kernel
    mine, peer = turns.get((s.rank, case), []), turns.get((s.peer, case), [])
    if len(mine) < 3 or len(mine) != len(peer):
        return []
    return [p / m for m, p in zip(mine, peer, strict=True)]


def inconclusive(ratios: list[float], policy: SpeedPolicy) -> bool:
    """Neither confirmed (the interval below the bar) nor cleared (the interval above `1 - min_gap`)."""
    _, lo, hi = paired_interval(ratios, policy.confidence)
    return hi >= policy.bar and lo < 1.0 - policy.min_gap


def extension_options(results: list[ProbeResult], found: list[Suspect], policy: SpeedPolicy) -> dict[str, str]:
    """The second retest stage's options: the suspects whose first retest was inconclusive and that
    were not extended yet; {} for none."""
    turns = _turns(results)
    todo = [s for s in found if (first := _paired(turns, s)) and inconclusive(first, policy)
            and (s.rank, f"{s.kernel}/{EXTENDED}") not in turns]
    return {**retest_options(todo), "retest_stage": EXTENDED} if todo else {}


def judge(results: list[ProbeResult], policy: SpeedPolicy, metric_by_probe: dict[str, str],
          kernel_by_probe: dict[str, str]) -> list[Judgement]:
    """`slow` for every suspect its retest confirms; a note for every suspect cleared or never retested."""
    turns = _turns(results)
    busy, foreign = _retest_param(results, "host_busy_share"), _retest_param(results, "foreign_share")
    out = []
    for s in suspects(results, policy, metric_by_probe, kernel_by_probe):
        if s.shared:
            out.append(Judgement(rank=s.rank, probe=NOTED, case=s.kernel, verdict=Verdict.PASS, reason=(
                f"{s.kernel} kernel {s.ratio:.2f}x its peers ({s.evidence}), not judged: a {s.shared} device's "
                f"{s.kernel} speed is its host's, shared with every core and tenant there; a slow core shows "
                f"in its GEMMs")))
            continue
        first = _paired(turns, s)
        if not first:
            out.append(Judgement(rank=s.rank, probe=NOTED, case=s.kernel, verdict=Verdict.PASS, reason=(
                f"speed suspect, not retested: {s.ratio:.2f}x its peers ({s.evidence}); not called slow "
                f"without an interleaved retest")))
            continue
        more = _paired(turns, s, EXTENDED)
        ratio, lo, hi = paired_interval(first + more, policy.confidence)
        rounds = f"{len(first)}+{len(more)}" if more else f"{len(first)}"
        where = (f"{rounds} interleaved rounds of the {s.kernel} kernel against rank {s.peer}; "
                 f"suspected from {s.evidence}")
        metrics = {"ratio": ratio, "ratio_lo": lo, "ratio_hi": hi, "rounds": float(len(first) + len(more))}
        b_mine, b_peer, f_mine, f_peer = (_in_turns(fig, rank, s.kernel) for fig, rank in
                                          ((busy, s.rank), (busy, s.peer), (foreign, s.rank), (foreign, s.peer)))
        why = (f"the host was {b_mine:.0%} busy in its retest turns and {b_peer:.0%} in its peer's"
               if b_mine - b_peer >= HOST_BUSY_GAP else
               f"other processes took {f_mine:.0%} of its cores in its retest turns and {f_peer:.0%} of its peer's"
               if f_mine - f_peer >= HOST_BUSY_GAP else "")
        if hi < policy.bar and why:
            out.append(Judgement(rank=s.rank, probe=RETEST, case=s.kernel, verdict=Verdict.PASS, metrics=metrics,
                                 reason=(f"speed suspect not judged: {ratio:.2f}x its peer, {policy.confidence:.0%} "
                                         f"interval {lo:.2f}-{hi:.2f}, but {why}: other work slows a CPU core in ways "
                                         f"its CPU time cannot see ({where})")))
        elif hi < policy.bar:
            out.append(Judgement(rank=s.rank, probe=RETEST, case=s.kernel, verdict=Verdict.SLOW, metrics=metrics,
                                 reason=(f"slow: {ratio:.2f}x its peer, {policy.confidence:.0%} interval "
                                         f"{lo:.2f}-{hi:.2f}, confirmed by retest ({where})")))
        else:
            out.append(Judgement(rank=s.rank, probe=RETEST, case=s.kernel, verdict=Verdict.PASS, metrics=metrics,
                                 reason=(f"speed suspect cleared by retest: {ratio:.2f}x its peer, "
                                         f"{policy.confidence:.0%} interval {lo:.2f}-{hi:.2f} ({where})")))
    return out


def paired_interval(ratios: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Geometric mean of paired ratios and its two-sided t interval (on the logs)."""
    xs = [math.log(x) for x in ratios]
    n = len(xs)
    mean = statistics.fmean(xs)
    half = _t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile by the Cornish-Fisher expansion around the normal (within 1% for df >= 3)."""
    z = statistics.NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


# ---- links ---------------------------------------------------------------------------------------

LinkKey = tuple[int, int]
MAX_LINK_RETESTS = 8
"""Slow links retested per run (the slowest first, at most two per endpoint)."""


def link_suspects(links: LinksSummary, hosts: Mapping[int, str]) -> list[tuple[LinkKey, LinkKey]]:
    """Each directed link the link analysis calls slow, with the peer link it is retested against:
    a passing link of its kind (both ends on one host, or not), sharing no end with it when one
    exists, of median bandwidth. Deterministic: the judge finds the same pairs again."""
    def kind(x: LinkJudgement) -> bool:
        return hosts.get(x.src) == hosts.get(x.dst)

    ok = [x for x in links.links if x.verdict is Verdict.PASS and x.gbps is not None]
    out: list[tuple[LinkKey, LinkKey]] = []
    per_end: dict[int, int] = defaultdict(int)
    slow = sorted((x for x in links.links if x.verdict is Verdict.SLOW), key=lambda x: (x.gbps or 0.0, x.src, x.dst))
    for s in slow:
        # a slow endpoint makes all its links slow: two of them are enough to confirm it
        if len(out) >= MAX_LINK_RETESTS or per_end[s.src] >= 2 or per_end[s.dst] >= 2:
            continue
        same = [x for x in ok if kind(x) == kind(s)]
        apart = [x for x in same if not {x.src, x.dst} & {s.src, s.dst}] or same
        if not apart:
            continue
        apart.sort(key=lambda x: (x.gbps or 0.0, x.src, x.dst))
        peer = apart[(len(apart) - 1) // 2]
        out.append(((s.src, s.dst), (peer.src, peer.dst)))
        per_end[s.src] += 1
        per_end[s.dst] += 1
    return out


def link_retest_option(pairs: list[tuple[LinkKey, LinkKey]]) -> dict[str, str]:
    return {"retest_link": ",".join(f"{a}>{b}:{c}>{d}" for (a, b), (c, d) in pairs)} if pairs else {}


def _retested(peers: dict[LinkKey, LinkKey], turns: dict[str, list[float]]) -> set[LinkKey]:
    """The suspect links that have retest turns (their own and their peer's)."""
    return {k for k, p in peers.items() if len(turns.get(f"{k[0]}>{k[1]}", [])) >= 3
            and len(turns.get(f"{p[0]}>{p[1]}", [])) == len(turns[f"{k[0]}>{k[1]}"])}


def confirm_links(links: LinksSummary, endpoint_js: list[Judgement], results: list[ProbeResult],
                  hosts: Mapping[int, str], policy: SpeedPolicy) -> tuple[LinksSummary, list[Judgement]]:
    """A slow link stays slow only when its retest against a peer link confirms it (the paired
    ratio's interval below `1 - min_gap / 2`); otherwise it passes with a note. An endpoint called
    slow from its links stays slow only while its links to two partners do (`_one_cable`)."""
    turns: dict[str, list[float]] = {}
    for r in results:
        if r.probe == RETEST and r.case == "link" and r.error is None:
            turns.update(r.params.get("link_turn_s") or {})
    peers = dict(link_suspects(links, hosts))
    retested = _retested(peers, turns)
    kept: list[LinkJudgement] = []
    ratios: dict[LinkKey, float] = {}
    for x in links.links:
        if x.verdict is not Verdict.SLOW:
            kept.append(x)
            continue
        if (x.src, x.dst) not in retested:
            kept.append(x)  # settled below, once the confirmed links are known
            continue
        peer = peers[(x.src, x.dst)]
        mine, theirs = turns[f"{x.src}>{x.dst}"], turns[f"{peer[0]}>{peer[1]}"]
        ratio, lo, hi = paired_interval([p / m for m, p in zip(mine, theirs, strict=True)], policy.confidence)
        ratios[(x.src, x.dst)] = ratio
        what = (f"{ratio:.2f}x link {peer[0]}->{peer[1]}, {policy.confidence:.0%} interval {lo:.2f}-{hi:.2f} "
                f"over {len(mine)} interleaved rounds")
        if hi < policy.bar:
            kept.append(replace(x, reason=f"{x.reason}; confirmed by retest: {what}"))
        else:
            kept.append(replace(x, verdict=Verdict.PASS, reason=f"link speed suspect cleared by retest: {what}"))
    confirmed = {e for x in kept if x.verdict is Verdict.SLOW and (x.src, x.dst) in retested
                 for e in (x.src, x.dst)}
    # a slow link not retested stays slow only beside a confirmed one on a shared end (a slow endpoint)
    kept = [x if x.verdict is not Verdict.SLOW or (x.src, x.dst) in retested
            else replace(x, reason=f"{x.reason}; its end's retest confirmed it") if {x.src, x.dst} & confirmed
            else replace(x, verdict=Verdict.PASS, reason=f"link speed suspect, not retested ({x.reason})")
            for x in kept]
    still = {e for x in kept if x.verdict is Verdict.SLOW for e in (x.src, x.dst)}
    flagged = [(x, k) for x, k in zip(links.links, kept, strict=True) if x.verdict is Verdict.SLOW]
    js = [j if j.verdict is not Verdict.SLOW else
          replace(j, verdict=Verdict.PASS, reason=f"cleared: none of its slow links was confirmed by retest "
                                                  f"({j.reason})") if j.rank not in still else
          _one_cable(j, [k for x, k in flagged if j.rank in (x.src, x.dst)
                         and (k.verdict is Verdict.SLOW or ratios.get((k.src, k.dst), 1.0) < policy.bar)])
          for j in endpoint_js]
    # a link whose reason blames an endpoint the retests cleared says so
    uncalled = sorted(j.rank for j, was in zip(js, endpoint_js, strict=True)
                      if was.verdict is Verdict.SLOW and j.verdict is Verdict.PASS and j.rank in still)
    kept = [replace(x, reason=f"{x.reason}; the retests cleared endpoint "
                              f"{' and '.join(str(e) for e in uncalled if e in (x.src, x.dst))}: suspect this link")
            if x.verdict is Verdict.SLOW and {x.src, x.dst} & set(uncalled) else x for x in kept]
    return replace(links, links=kept), js


def _one_cable(j: Judgement, slow: list[LinkJudgement]) -> Judgement:
    """An endpoint is blamed for slow links to two or more partners; it stays slow only while two
    partners' links stay slow after the retests (`slow`: its links still slow, or retested and not
    clearly at full speed). Otherwise the slowness is one cable's. On a 4-device host one noisy link
    beside a slow cable makes two of three slow; the cable's other end was called slow to receive
    (this VM, `slow:rank=0,op=send,peer=1`: 2 of 8 sweeps)."""
    partners = {x.dst if x.src == j.rank else x.src for x in slow}
    if len(partners) >= 2:
        return j
    left = ", ".join(f"{x.src}->{x.dst}" for x in slow if x.verdict is Verdict.SLOW)
    return replace(j, verdict=Verdict.PASS, reason=(
        f"cleared: after the retests only {left} of its links is slow: that link, not the endpoint ({j.reason})"))
