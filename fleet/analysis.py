"""Fleet judgement: consensus among devices of one fingerprint, and who is slow.

Pure functions over typed results; no I/O. A probe measures, the fleet decides:
- consensus: every device with the same fingerprint computing the same case from the same
  inputs must produce the same bits. The majority hash (over more than half of the voters,
  after removing devices their own oracles already caught) is right; a minority is `wrong`.
  A group with no majority is reported as such (`no_majority`) and its members are left to the
  judge (fleet.judge.blame), which pins the fault on a member with evidence of its own or calls
  the group `suspect`: never silently passed, never `wrong` for everyone. In a collective probe
  (`collective`) ranks exchange data, so a minority of several ranks holds one value alike (e.g. a
  tensor-parallel pair): it is a suspicion for the judge too, not several independent witnesses.
- slow: a device's throughput against the median of its *peers* (the others of its
  fingerprint), as a ratio per case; the device is slow when its median ratio over cases is at
  least `min_gap` below 1 and, with enough peers, also a robust (median/MAD) outlier.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..results import ConsensusGroup, Judgement, ProbeResult, Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowPolicy:
    min_gap: float = 0.10
    """Minimum relative shortfall against the peers' median (0.10 = 10% slower)."""
    z: float = 3.5
    """Robust z-score (|x - median| / (1.4826 MAD)) a slow device must also exceed, with >= 4 peers."""
    metric: str = "tflops_best"
    """Throughput metric compared (higher is better): the best call's, which host noise cannot inflate."""


def consensus(results: list[ProbeResult], collective: frozenset[str] = frozenset()
              ) -> tuple[list[Judgement], list[ConsensusGroup]]:
    groups: dict[tuple[str, str, str], list[ProbeResult]] = defaultdict(list)
    for r in results:
        if r.output_hash and r.error is None:
            groups[(r.fingerprint, r.probe, r.case)].append(r)
    judgements: list[Judgement] = []
    summary: list[ConsensusGroup] = []
    for (fp, probe, case), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        voters = [m for m in members if m.verdict is Verdict.PASS]
        if not voters:  # every member is already caught by its own oracles: nothing left to vote on
            continue
        counts: dict[str, int] = defaultdict(int)
        for m in voters:
            counts[m.output_hash] += 1
        top, n_top = max(counts.items(), key=lambda kv: kv[1], default=("", 0))
        # One distinct output among the voters is agreement, even with a single voter left.
        has_majority = n_top * 2 > len(voters) or len(counts) <= 1
        if has_majority:
            dissent = [m for m in members if m.output_hash != top]
        else:
            dissent = list(voters)
        shared = not has_majority or (probe in collective and len(dissent) > 1)
        for m in ([] if shared else dissent):
            reason = (f"consensus: output bits differ from the majority ({n_top} of {len(voters)} devices "
                      f"with fingerprint {fp} agree; hash {m.output_hash[:12]} vs {top[:12]})")
            judgements.append(Judgement(rank=m.rank, probe=probe, case=case, verdict=Verdict.WRONG, reason=reason,
                                        metrics={"agree": float(n_top), "voters": float(len(voters))}))
        summary.append(ConsensusGroup(fingerprint=fp, probe=probe, case=case, devices=len(members), majority_hash=top,
                                      agree=n_top, no_majority=shared,
                                      dissenters=tuple(sorted(m.rank for m in dissent))))
    return judgements, summary


def slow(results: list[ProbeResult], policy: SlowPolicy = SlowPolicy(),
         metric_by_probe: dict[str, str] | None = None) -> list[Judgement]:
    """Devices slower than their fingerprint peers, per probe (ratios over that probe's cases).

    `metric_by_probe` names each probe's speed metric (higher is better); others use policy.metric.
    """
    metric_by_probe = metric_by_probe or {}
    by_case: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in results:
        metric = metric_by_probe.get(r.probe, policy.metric)
        if not metric:  # the probe's speed is judged elsewhere (links: over the link matrix)
            continue
        v = r.metrics.get(metric)
        if r.error is None and v is not None and v > 0:
            by_case[(r.fingerprint, r.probe, r.case)][r.rank] = v
    ratios: dict[tuple[int, str], list[float]] = defaultdict(list)
    outlier: dict[tuple[int, str], list[bool]] = defaultdict(list)
    for (_, probe, _case), vals in by_case.items():
        if len(vals) < 2:
            continue
        ranks = list(vals)
        ratio, flag = peer_ratios(np.fromiter(vals.values(), dtype=np.float64, count=len(vals)), policy.z)
        for rank, q, f in zip(ranks, ratio.tolist(), flag.tolist(), strict=True):
            ratios[(rank, probe)].append(q)
            outlier[(rank, probe)].append(f)
    out = []
    for (rank, probe), rs in sorted(ratios.items()):
        ratio = statistics.median(rs)
        flags = outlier[(rank, probe)]
        if ratio <= 1.0 - policy.min_gap and sum(flags) * 2 > len(flags):
            out.append(Judgement(rank=rank, probe=probe, case="*", verdict=Verdict.SLOW,
                                 reason=(f"slow: {metric_by_probe.get(probe, policy.metric)} is {ratio:.2f}x the "
                                         f"median of its fingerprint peers "
                                         f"(median over {len(rs)} cases; threshold {1 - policy.min_gap:.2f}x)"),
                                 metrics={"ratio_to_peers": ratio}))
    return out


def _loo_median(s: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Median of the sorted array `s` without its element at each index in `pos` (exact, O(1) each).

    The remaining n-1 values in order are s[k] for k < pos and s[k+1] after it, so the middle
    one(s) are read straight from `s`.
    """
    m = len(s) - 1

    def kth(k: int) -> np.ndarray:
        return np.where(k < pos, s[k], s[np.minimum(k + 1, len(s) - 1)])

    return kth(m // 2) if m % 2 else (kth(m // 2 - 1) + kth(m // 2)) / 2


def peer_ratios(v: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Per device: its value / the median of its peers (the others), and whether it is a robust low outlier.

    Exactly what comparing each device with the list of all the others gives, in O(n log n) instead of
    O(n^2): the leave-one-out median takes at most three distinct values, so the peers' absolute
    deviations are sorted once per distinct median and their leave-one-out median read the same way.
    """
    order = np.argsort(v, kind="stable")
    s = v[order]
    pos = np.empty(len(v), dtype=np.int64)
    pos[order] = np.arange(len(v))
    med = _loo_median(s, pos)
    ratio = v / med
    flag = np.ones(len(v), dtype=bool)
    if len(v) - 1 < 4:  # too few peers for a spread: the ratio alone decides
        return ratio, flag
    mad = np.empty(len(v))
    for mu in np.unique(med):
        idx = np.nonzero(med == mu)[0]
        dev = np.abs(v - mu)
        dev_sorted = np.sort(dev)
        # removing any element equal to this device's deviation leaves the same multiset
        mad[idx] = _loo_median(dev_sorted, np.searchsorted(dev_sorted, dev[idx]))
    with np.errstate(divide="ignore", invalid="ignore"):
        zscore = np.where(mad > 0, (med - v) / (1.4826 * mad), np.where(v < med, np.inf, 0.0))
    return ratio, zscore >= z
