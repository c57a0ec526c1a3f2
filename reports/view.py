"""What a person needs to see, derived once from a `RunSummary`: the shared model of the rich reports.

The HTML and JUnit reports both read this view rather than re-reading `ProbeSummary.cases`, so
"what went wrong" is worded the same everywhere. Pure: results in, plain dataclasses out.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..results import (
    SEVERITY,
    DeviceSummary,
    ErrorInfo,
    Judgement,
    Mismatch,
    ProbeSummary,
    RunSummary,
    Verdict,
)

# Bit layout of the output dtypes the probes use: (width, first exponent bit, sign bit). The
# histogram shades the fields so "an exponent bit flipped" is visible without decoding.
DTYPE_BITS = {"float32": (32, 23, 31), "bfloat16": (16, 7, 15), "float16": (16, 10, 15), "float64": (64, 52, 63)}


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseView:
    """One probe case on one device, with its output dtype."""

    case: str
    verdict: Verdict
    repeats: int
    repeats_bad: int
    dtype: str
    mismatches: list[Mismatch]
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BitHistogram:
    """Flipped bit positions (counted over elements and repeats) for outputs of one dtype."""

    dtype: str
    counts: tuple[tuple[int, int], ...]
    """(bit position, count), ascending by position."""

    @property
    def key(self) -> str:
        """Identity for de-duplication: identical histograms are drawn once per report."""
        return self.dtype + ":" + ",".join(f"{b}x{n}" for b, n in self.counts)

    @property
    def text(self) -> str:
        return ", ".join(f"bit {b} x{n}" for b, n in self.counts)


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureCard:
    """One failing (device, probe): what went wrong, where in the output, and how often."""

    rank: int
    device: str
    host: str
    uuid: str
    fingerprint: str
    probe: str
    verdict: Verdict
    modes: tuple[str, ...]
    reasons: list[str]
    cases: list[CaseView]
    histograms: list[BitHistogram]
    fleet: list[Judgement]

    @property
    def anchor(self) -> str:
        return f"fail-{self.rank}-{self.probe}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureMode:
    """One way devices failed (e.g. `matmul wrong: exact`), with how much of the fleet it hit."""

    name: str
    verdict: Verdict
    ranks: list[int]
    fraction: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputGroup:
    """Throughput of one fingerprint group, relative to the group's own median (1.0 = typical)."""

    fingerprint: str
    devices: int
    median_tflops: dict[str, float]
    """probe:case -> the group's median TFLOP/s, for the cases whose speed metric is in TFLOP/s."""
    ratios: list[float]
    """Per device: median over cases of (device / group median), each case on its probe's speed metric."""
    outliers: list[tuple[int, str, float]]
    """(rank, label, ratio) of the devices the fleet judged slow."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRow:
    """One row of the device table."""

    rank: int
    device: str
    host: str
    uuid: str
    fingerprint: str
    verdict: Verdict
    probes: str
    """`probe=verdict` pairs, for filtering."""
    ratio: float | None
    summary: str
    """The first reason a person should read (empty for a passing device)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunView:
    """Everything the rich reports show about one run."""

    summary: RunSummary
    counts: dict[Verdict, int]
    failing: int
    modes: list[FailureMode]
    rows: list[DeviceRow]
    cards: list[FailureCard]
    groups: list[ThroughputGroup]
    no_majority: list[str] = field(default_factory=list)

    @property
    def fraction_failing(self) -> float:
        return self.failing / len(self.summary.devices) if self.summary.devices else 0.0


def case_views(p: ProbeSummary) -> list[CaseView]:
    """The cases of one probe summary, typed."""
    out = []
    for c in p.cases:
        out.append(CaseView(
            case=c.case, verdict=c.verdict, repeats=c.repeats, repeats_bad=c.repeats_bad,
            dtype=str(c.params.get("out_dtype") or c.params.get("dtype", "")),
            mismatches=list(c.mismatches), error=c.error,
        ))
    return out


def fleet_judgements(p: ProbeSummary) -> list[Judgement]:
    return list(p.fleet)


def failure_modes_of(cases: list[CaseView], fleet: list[Judgement]) -> tuple[str, ...]:
    """Short names of how a probe failed: `wrong: exact`, `error: timeout`, `slow`, ..."""
    modes: list[str] = []
    for c in cases:
        if c.error is not None:
            modes.append(f"error: {c.error.kind.value}")
        elif c.verdict is not Verdict.PASS:
            modes.extend(f"{c.verdict.value}: {m.oracle.value}" for m in c.mismatches)
            if not c.mismatches:
                modes.append(c.verdict.value)
    for j in fleet:
        if j.verdict is Verdict.PASS:
            continue
        # fleet judgements carry their oracle as the reason's prefix ("consensus: ...", "slow: ...")
        oracle = j.reason.split(":", 1)[0]
        modes.append(j.verdict.value if oracle == j.verdict.value else f"{j.verdict.value}: {oracle}")
    return tuple(dict.fromkeys(modes))


def histograms_of(cases: list[CaseView]) -> list[BitHistogram]:
    """Flipped-bit counts summed over a probe's cases, one histogram per output dtype."""
    by_dtype: dict[str, Counter[int]] = defaultdict(Counter)
    for c in cases:
        for m in c.mismatches:
            by_dtype[c.dtype].update(m.bit_histogram)
    return [BitHistogram(dtype=dt, counts=tuple(sorted(cnt.items()))) for dt, cnt in sorted(by_dtype.items())
            if cnt]


def throughput(s: RunSummary, metric_by_probe: Mapping[str, str] | None = None
               ) -> tuple[list[ThroughputGroup], dict[int, float]]:
    """Per fingerprint group: each device's speed against the group median; and rank -> ratio.

    Each probe is read on the metric the speed judge reads it by (its registry `speed_metric`:
    TFLOP/s for compute, GB/s for memory copies, bus GB/s for collectives), which its summary
    carries (`ProbeSummary.speed_metric`); `metric_by_probe`, when given, overrides it per probe."""
    # (fingerprint, probe:case) -> rank -> value
    values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for d in s.devices:
        for p in d.probes:
            metric = metric_by_probe.get(p.probe, "") if metric_by_probe is not None else p.speed_metric
            if not metric:
                continue
            suffix = ":" + metric
            for k, v in p.metrics.items():
                if k.endswith(suffix) and isinstance(v, (int, float)) and v == v and v > 0:
                    values[d.fingerprint][f"{p.probe}:{k[: -len(suffix)]}:{metric}"][d.rank] = float(v)
    slow_ranks = {d.rank for d in s.devices if any(p.verdict is Verdict.SLOW for p in d.probes)}
    labels = {d.rank: f"{d.host} {d.device}" for d in s.devices}
    groups: list[ThroughputGroup] = []
    ratio_of: dict[int, float] = {}
    for fp, cases in values.items():
        medians = {case: statistics.median(vals.values()) for case, vals in cases.items()}
        per_rank: dict[int, list[float]] = defaultdict(list)
        for case, vals in cases.items():
            for rank, v in vals.items():
                per_rank[rank].append(v / medians[case])
        ratios = {rank: statistics.median(rs) for rank, rs in per_rank.items()}
        ratio_of.update(ratios)
        outliers = sorted(((r, labels[r], x) for r, x in ratios.items() if r in slow_ranks), key=lambda t: t[2])
        # compute probes' figures, whichever TFLOP/s metric each is judged by (best call; a burn's median)
        tflops = {c.rsplit(":", 1)[0]: v for c, v in medians.items() if c.endswith((":tflops_best", ":tflops"))}
        groups.append(ThroughputGroup(fingerprint=fp, devices=len(ratios), median_tflops=tflops,
                                      ratios=sorted(ratios.values()), outliers=outliers))
    groups.sort(key=lambda g: -g.devices)
    return groups, ratio_of


def build(s: RunSummary) -> RunView:
    """Derive the report view of a run (linear in the number of devices and cases)."""
    counts = Counter(d.verdict for d in s.devices)
    groups, ratio_of = throughput(s)
    cards: list[FailureCard] = []
    rows: list[DeviceRow] = []
    mode_ranks: dict[tuple[str, Verdict], list[int]] = defaultdict(list)
    for d in s.devices:
        first_reason = ""
        for p in d.probes:
            if p.verdict is Verdict.PASS:
                continue
            card = _card(d, p)
            cards.append(card)
            first_reason = first_reason or (card.reasons[0] if card.reasons else "")
            for m in card.modes:
                verdict = Verdict(m.split(":", 1)[0])
                ranks = mode_ranks[(f"{p.probe} {m}", verdict)]
                if not ranks or ranks[-1] != d.rank:
                    ranks.append(d.rank)
        if d.verdict is not Verdict.PASS and not d.probes:
            first_reason = "no probe reported a result for this device"
            mode_ranks[("device error: no results", Verdict.ERROR)].append(d.rank)
        rows.append(DeviceRow(rank=d.rank, device=d.device, host=d.host, uuid=d.uuid, fingerprint=d.fingerprint,
                              verdict=d.verdict, probes=" ".join(f"{p.probe}={p.verdict.value}" for p in d.probes),
                              ratio=ratio_of.get(d.rank), summary=first_reason))
    n = len(s.devices) or 1
    modes = [FailureMode(name=name, verdict=v, ranks=ranks, fraction=len(ranks) / n)
             for (name, v), ranks in mode_ranks.items()]
    modes.sort(key=lambda m: (-SEVERITY[m.verdict], -len(m.ranks), m.name))
    # worst first, then by rank: the card the on-call person must read comes first
    cards.sort(key=lambda c: (-SEVERITY[c.verdict], c.rank, c.probe))
    no_majority = [f"{g.probe} {g.case}: no majority among {g.devices} devices of fingerprint {g.fingerprint}"
                   for g in s.groups if g.no_majority]
    return RunView(summary=s, counts={v: counts.get(v, 0) for v in Verdict}, failing=len(s.failed), modes=modes,
                   rows=rows, cards=cards, groups=groups, no_majority=no_majority)


def _card(d: DeviceSummary, p: ProbeSummary) -> FailureCard:
    cases = case_views(p)
    fleet = fleet_judgements(p)
    return FailureCard(rank=d.rank, device=d.device, host=d.host, uuid=d.uuid, fingerprint=d.fingerprint,
                       probe=p.probe, verdict=p.verdict, modes=failure_modes_of(cases, fleet),
                       reasons=list(p.reasons), cases=[c for c in cases if c.verdict is not
                                                                          Verdict.PASS],
                       histograms=histograms_of(cases), fleet=fleet)
