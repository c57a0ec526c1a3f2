"""Who throttled: a burn whose throughput fell and stayed down is `slow` only on evidence beyond
its own timeline.

A device's timeline alone does not tell a throttling chip from a busy host: on the 2-core CI host
a clean 0.8 s CPU burn ends at 0.73x-1.23x of its start (15 runs), some with a clean step down.
So the timeline makes a candidate, and something else confirms it:

1. Candidate: a burn case whose last quarter ran at or below `1 - min_gap` of its first quarter,
   with a sustained drop that has an onset (probes/burn.py measures both, per iteration).
2. The driver's word: where NVML sampled a clock-event reason that slows a chip beyond its set
   limits (thermal slowdown, hardware slowdown, power brake) from the drop's onset on, the
   candidate is `slow`, those reasons named. A reason seen only before the drop explains nothing
   of it (NVML may report a hardware slowdown for a moment at a clock or P-state change).
3. Otherwise it is a speed suspect like any other (fleet.judge.speed): retested on the GEMM,
   interleaved against a peer of its fingerprint, alone on the host, and `slow` only when the
   retest confirms it. A host-wide slowdown slows the peer as much and is cleared; a candidate
   with no peer to retest against is noted, not called.

The software power cap is not the driver's word: it says the clocks are held under the power limit
the chip is set to, which a healthy chip reaches under a full GEMM burn (an H200's 10 s bf16 burn
reported it at 9 s, clocks still at 1980 MHz, 2026-12-04). A chip that loses more to it than its
peers shows against them in the retest; a whole node capped low shows against the SKU baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...results import Judgement, ProbeResult, Verdict

BURN = "burn"
SLOWING = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"})
"""NVML clock-event reasons (probes/burn.REASONS) that slow a chip beyond the limits it is set to."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A burn case whose throughput fell by the gap and stayed down."""

    rank: int
    case: str
    fingerprint: str
    ratio: float
    """Throughput at the end of the burn over its start."""
    onset_s: float
    reasons: tuple[str, ...]
    """NVML clock-event reasons sampled from the drop's onset on, the idle and settings ones left out."""

    @property
    def slowing(self) -> tuple[str, ...]:
        """The reasons that are the driver's word on a slowed chip (`SLOWING`)."""
        return tuple(r for r in self.reasons if r in SLOWING)

    def describe(self) -> str:
        return f"burn {self.case} fell to {self.ratio:.2f}x of its start from t={self.onset_s:.1f} s"

    def drivers_word(self) -> str:
        """What NVML said during the burn, for a suspect's evidence."""
        return f"NVML: {', '.join(self.reasons)}, not a slowdown by itself" if self.reasons else "no NVML reasons"


def candidates(results: list[ProbeResult], min_gap: float) -> list[Candidate]:
    out = []
    for r in results:
        if r.probe != BURN or r.error is not None:
            continue
        ratio, onset = r.metrics.get("throughput_ratio", 1.0), r.metrics.get("throttle_onset_s")
        if onset is None or ratio > 1.0 - min_gap:
            continue
        out.append(Candidate(rank=r.rank, case=r.case, fingerprint=r.fingerprint, ratio=ratio, onset_s=onset,
                             reasons=_reasons_from(r, onset)))
    return out


def _reasons_from(r: ProbeResult, onset_s: float) -> tuple[str, ...]:
    """The burn's NVML reasons sampled in its timeline's windows from `onset_s` on (each window keeps its
    last sample); without NVML samples in the timeline, the whole burn's (`throttle_reasons`)."""
    from ...probes.burn import BENIGN, reason_names

    reasons = tuple(r.params.get("throttle_reasons") or ())
    windows = [w for w in r.params.get("timeline") or [] if "reasons" in w]
    if not windows:
        return reasons
    during = {n for w in windows if w["t_s"] + w["w_s"] > onset_s for n in reason_names(int(w["reasons"]) & ~BENIGN)}
    return tuple(x for x in reasons if x in during)


def unexplained(results: list[ProbeResult], min_gap: float) -> list[Candidate]:
    """Candidates without the driver's word: speed suspects, for the retest to confirm or clear."""
    return [c for c in candidates(results, min_gap) if not c.slowing]


def judgements(results: list[ProbeResult], min_gap: float) -> list[Judgement]:
    """`slow` for every candidate whose slowdown the driver reported while it happened."""
    return [Judgement(rank=c.rank, probe=BURN, case=c.case, verdict=Verdict.SLOW,
                      reason=f"throttled: {c.describe()}, NVML reasons {', '.join(c.reasons)}",
                      metrics={"throughput_ratio": c.ratio, "throttle_onset_s": c.onset_s})
            for c in candidates(results, min_gap) if c.slowing]
