"""Typed results that flow from probes to the store to the reports.

Everything here is plain data (dataclasses and enums) with lossless JSON round-trips, so
the worker can stream results over a pipe, the store can keep them in SQLite and the
reports can render them without importing torch.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class Verdict(enum.StrEnum):
    """Outcome for one device (or link) and probe; ordered from best to worst by `SEVERITY`."""

    PASS = "pass"
    SLOW = "slow"
    FLAKY = "flaky"
    WRONG = "wrong"
    ERROR = "error"
    SUSPECT = "suspect"
    """A named group holds a fault that could not be pinned to one member: retest the group."""

    @staticmethod
    def worst(verdicts: list[Verdict] | tuple[Verdict, ...]) -> Verdict:
        """The most severe of `verdicts` (PASS for none)."""
        return max(verdicts, key=lambda v: SEVERITY[v], default=Verdict.PASS)


# `wrong` outranks `error`: a chip that computed wrong bits is worse news than one that
# could not run a probe, and a run with both must lead with the corruption. `suspect` is below
# `error`: the group is known to hold a fault, but no member is blamed.
SEVERITY = {Verdict.PASS: 0, Verdict.SLOW: 1, Verdict.FLAKY: 2, Verdict.SUSPECT: 3, Verdict.ERROR: 4,
            Verdict.WRONG: 5}
BLAMED = frozenset({Verdict.SLOW, Verdict.FLAKY, Verdict.WRONG, Verdict.ERROR})
"""Verdicts that name the device itself (what the failing fraction counts); `suspect` names a group."""
CORRUPT = frozenset({Verdict.WRONG, Verdict.FLAKY})
"""The verdicts of bad bits (a case's local ones are held against a device only on its own evidence)."""


class ErrorKind(enum.StrEnum):
    """Why a probe could not run: never confused with a wrong or slow chip."""

    TIMEOUT = "timeout"
    CRASH = "crash"
    DEVICE_LOST = "device_lost"
    INVALID_CONFIG = "invalid_config"
    EXCEPTION = "exception"
    UNSUPPORTED = "unsupported"
    PEER_LOST = "peer_lost"
    """Not run: another rank of the group was lost (crashed, hung). Evidence against that rank, not this
    one: such a case is recorded with verdict `pass` and this error, so it never counts against the device."""


class RunStatus(enum.StrEnum):
    """Whether a run reached its end: a run cut short is `interrupted`, never a clean verdict."""

    COMPLETE = "complete"
    INTERRUPTED = "interrupted"
    """Cut short (SIGINT/SIGTERM, killed, its host lost): what was measured is kept, the rest is missing."""
    RUNNING = "running"
    """Still in progress (its process is alive on this host)."""


class DeviceKind(enum.StrEnum):
    CUDA = "cuda"
    ROCM = "rocm"
    CPU = "cpu"
    TPU = "tpu"


class Oracle(enum.StrEnum):
    """Which independent check saw a problem."""

    EXACT = "exact"
    FREIVALDS = "freivalds"
    REPEAT = "repeat"
    CONSENSUS = "consensus"
    REFERENCE = "fp64_reference"
    NONFINITE = "nonfinite"
    CROSS_BACKEND = "cross_backend"
    """Two implementations of one op (e.g. SDPA backends) disagree on the same inputs on one chip."""
    REPLICA = "replica"
    """Replicas that must hold identical bits (data-parallel parameters, a gradient shard computed
    twice) disagree; the minority or the one farther from float64 is named."""


class Blame(enum.StrEnum):
    """Whose computation a mismatch is evidence against (fleet.judge.blame reads it)."""

    OWN = "own"
    """This device's own output: a local oracle fired, it lost a strict-majority vote, or a
    recomputation by another device with a tie-breaker named it."""
    SHARED = "shared"
    """A value every rank of `group` holds alike (a global loss, a vote with no majority): evidence
    that some member is bad, not which one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceInfo:
    """One accelerator, or one virtual CPU device (a worker process on a CPU-only host)."""

    index: int
    kind: DeviceKind
    name: str
    memory_bytes: int
    uuid: str
    host: str
    fingerprint: str
    fingerprint_fields: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kind.value}:{self.index}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceInfo:
        return cls(**{**d, "kind": DeviceKind(d["kind"])})


@dataclass(frozen=True, slots=True, kw_only=True)
class Mismatch:
    """What exactly went wrong in one output tensor, against one oracle."""

    oracle: Oracle
    tensor: str
    bad_elements: int
    total_elements: int
    first_indices: list[list[int]] = field(default_factory=list)
    tiles: list[list[int]] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    actual: list[float] = field(default_factory=list)
    expected_bits: list[str] = field(default_factory=list)
    actual_bits: list[str] = field(default_factory=list)
    bit_histogram: dict[int, int] = field(default_factory=dict)
    max_abs_error: float = 0.0
    note: str = ""
    blame: Blame = Blame.OWN
    group: list[int] = field(default_factory=list)
    """For `Blame.SHARED`: the global ranks that hold the value alike (this one included)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["oracle"] = self.oracle.value
        d["blame"] = self.blame.value
        d["bit_histogram"] = {str(k): v for k, v in self.bit_histogram.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mismatch:
        return cls(
            **{
                **d,
                "oracle": Oracle(d["oracle"]),
                "blame": Blame(d.get("blame", Blame.OWN.value)),
                "bit_histogram": {int(k): v for k, v in d.get("bit_histogram", {}).items()},
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    kind: ErrorKind
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "message": self.message}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErrorInfo:
        return cls(kind=ErrorKind(d["kind"]), message=d["message"])


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkResult:
    """One direction of one link (src -> dst), as measured by one of its ends.

    The sender measures latency and bandwidth; the receiver checks the payload bits. The two
    halves are merged by the fleet analysis.
    """

    src: int
    dst: int
    measured_by: int
    latency_us: float | None = None
    gbps: float | None = None
    bad_bytes: int = 0
    total_bytes: int = 0
    bit_histogram: dict[int, int] = field(default_factory=dict)
    first_bad_offset: int | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bit_histogram"] = {str(k): v for k, v in self.bit_histogram.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinkResult:
        return cls(**{**d, "bit_histogram": {int(k): v for k, v in d.get("bit_histogram", {}).items()}})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """One probe case (e.g. matmul / bfloat16 / random) on one device, as measured there.

    The verdict here is the *local* one (the device's own oracles). Fleet judgements
    (consensus, slowness) are made later over many results and stored as `Judgement`s.
    """

    run_id: str
    host: str
    rank: int
    device: str
    fingerprint: str
    probe: str
    case: str
    verdict: Verdict
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    repeats_bad: int = 0
    repeats: int = 0
    output_hash: str = ""
    repeat_hashes: tuple[str, ...] = ()
    """A case whose repeats disagree (and no oracle failed): each repeat's hash, for fleet consensus."""
    error: ErrorInfo | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0
    device_uuid: str = ""
    links: list[LinkResult] = field(default_factory=list)

    @property
    def own_evidence(self) -> bool:
        """Whether its wrong/flaky verdict rests on the device's own computation: a mismatch of
        `Blame.OWN`, or no mismatch behind it. A value a whole group holds alike (`Blame.SHARED`: a
        global loss, a vote with no majority) says some member is bad, not which (fleet.judge.blame)."""
        return self.verdict in CORRUPT and (not self.mismatches or any(m.blame is Blame.OWN for m in self.mismatches))

    @property
    def held(self) -> Verdict:
        """The part of its local verdict that is the device's own: `pass` for shared evidence only."""
        return Verdict.PASS if self.verdict in CORRUPT and not self.own_evidence else self.verdict

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["verdict"] = self.verdict.value
        d["mismatches"] = [m.to_dict() for m in self.mismatches]
        d["links"] = [link.to_dict() for link in self.links]
        d["error"] = self.error.to_dict() if self.error else None
        if self.repeat_hashes:
            d["repeat_hashes"] = list(self.repeat_hashes)
        else:  # absent, not empty: every body written before the field existed stays byte-identical
            del d["repeat_hashes"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        return cls(
            **{
                **d,
                "verdict": Verdict(d["verdict"]),
                "repeat_hashes": tuple(d.get("repeat_hashes", ())),
                "mismatches": [Mismatch.from_dict(m) for m in d.get("mismatches", [])],
                "error": ErrorInfo.from_dict(d["error"]) if d.get("error") else None,
                "links": [LinkResult.from_dict(x) for x in d.get("links", [])],
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Judgement:
    """A fleet-level finding about one device for one probe case (consensus or speed)."""

    rank: int
    probe: str
    case: str
    verdict: Verdict
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Judgement:
        return cls(**{**d, "verdict": Verdict(d["verdict"])})


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusGroup:
    """One (fingerprint, probe, case) vote: how many devices agreed on which bits."""

    fingerprint: str
    probe: str
    case: str
    devices: int
    majority_hash: str
    agree: int
    no_majority: bool
    dissenters: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dissenters"] = list(self.dissenters)
        return d


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseSummary:
    """One case of a probe on one device, as the reports show it."""

    case: str
    verdict: Verdict
    """What the case holds against this device (a pass when its only evidence is shared)."""
    repeats: int = 0
    repeats_bad: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    local_verdict: Verdict | None = None
    """The case's own verdict where it differs from `verdict` (shared evidence: the fleet says whose)."""
    mismatches: list[Mismatch] = field(default_factory=list)
    error: ErrorInfo | None = None
    output_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"case": self.case, "verdict": self.verdict.value, "repeats": self.repeats,
                             "repeats_bad": self.repeats_bad, "params": self.params}
        if self.local_verdict is not None:
            d["local_verdict"] = self.local_verdict.value
        if self.mismatches:
            d["mismatches"] = [m.to_dict() for m in self.mismatches]
        if self.error is not None:
            d["error"] = self.error.to_dict()
        if self.output_hash:
            d["output_hash"] = self.output_hash
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseSummary:
        return cls(case=str(d["case"]), verdict=Verdict(d["verdict"]), repeats=int(d.get("repeats", 0)),
                   repeats_bad=int(d.get("repeats_bad", 0)), params=dict(d.get("params") or {}),
                   local_verdict=Verdict(d["local_verdict"]) if d.get("local_verdict") else None,
                   mismatches=[Mismatch.from_dict(m) for m in d.get("mismatches", [])],
                   error=ErrorInfo.from_dict(d["error"]) if d.get("error") else None,
                   output_hash=str(d.get("output_hash", "")))


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSummary:
    """One probe on one device after local and fleet judgement: what the reports show."""

    probe: str
    verdict: Verdict
    metrics: dict[str, float]
    cases: list[CaseSummary] = field(default_factory=list)
    fleet: list[Judgement] = field(default_factory=list)
    """The fleet's judgements about this probe on this device (consensus, speed, blame, ...)."""
    reasons: list[str] = field(default_factory=list)
    """One line a person can act on per finding: the cases' own, then the fleet's."""
    speed_metric: str = ""
    """The metric the speed judge reads this probe by (its registry `speed_metric`: `tflops_best`,
    `gbps_best`, `busbw_gbps_best`); empty: not judged per device on speed (links, retest)."""

    def details(self) -> dict[str, Any]:
        """The JSON report's `details` object (schema chipcheck.run/1)."""
        d: dict[str, Any] = {"cases": [c.to_dict() for c in self.cases]}
        if self.fleet:
            d["fleet"] = [j.to_dict() for j in self.fleet]
        if self.reasons:
            d["reasons"] = list(self.reasons)
        return d


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSummary:
    rank: int
    device: str
    host: str
    uuid: str
    fingerprint: str
    verdict: Verdict
    probes: list[ProbeSummary]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkJudgement:
    """One direction of one link after the fleet's judgement."""

    src: int
    dst: int
    verdict: Verdict
    reason: str
    latency_us: float | None = None
    gbps: float | None = None
    bad_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d


@dataclass(frozen=True, slots=True, kw_only=True)
class LinksSummary:
    """The link sweep: per-link verdicts, N x N matrices and the inferred topology."""

    pairing: str
    rounds: int
    links: list[LinkJudgement]
    latency_us: list[list[float | None]]
    gbps: list[list[float | None]]
    bad_bytes: list[list[int]]
    topology_levels: list[str] = field(default_factory=list)
    topology_groups: list[list[int]] = field(default_factory=list)
    """Per endpoint, its group id at each level (outermost first)."""
    topology_text: str = ""
    disagreements: list[str] = field(default_factory=list)
    """Where the measured grouping disagrees with the declared topology."""

    @property
    def failed(self) -> list[LinkJudgement]:
        return [x for x in self.links if x.verdict is not Verdict.PASS]


def links_to_dict(s: LinksSummary) -> dict[str, Any]:
    d = asdict(s)
    d["links"] = [x.to_dict() for x in s.links]
    return d


def links_from_dict(d: dict[str, Any]) -> LinksSummary:
    links = [LinkJudgement(**{**x, "verdict": Verdict(x["verdict"])}) for x in d["links"]]
    return LinksSummary(**{**d, "links": links})


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """The whole run after fleet analysis."""

    run_id: str
    verdict: Verdict
    started: float
    ended: float
    profile: str
    seed: int
    devices: list[DeviceSummary]
    groups: list[ConsensusGroup] = field(default_factory=list)
    links: LinksSummary | None = None
    findings: list[str] = field(default_factory=list)
    """Fleet-level findings that are about no one device (e.g. a library that is wrong everywhere)."""
    status: RunStatus = RunStatus.COMPLETE
    """Whether the run reached its end; the verdict covers only what was measured."""
    missing: list[str] = field(default_factory=list)
    """For a run that is not complete: each planned case without a result, "rank N probe case"."""

    @property
    def failed(self) -> list[DeviceSummary]:
        """Devices blamed for a failure of their own (what the failing fraction counts)."""
        return [d for d in self.devices if d.verdict in BLAMED]

    @property
    def suspect(self) -> list[DeviceSummary]:
        """Devices of a group that holds a fault no check could pin to one member (retest them)."""
        return [d for d in self.devices if d.verdict is Verdict.SUSPECT]

    @property
    def headline(self) -> str:
        """The verdict as reports head it: "PASS", "WRONG", ...; a run that did not reach its end never
        reads as a pass: "INTERRUPTED", or "WRONG, run INTERRUPTED" for what it found before."""
        mark = self.verdict.upper()
        if self.status is RunStatus.COMPLETE:
            return mark
        state = self.status.value.upper()
        return state if self.verdict is Verdict.PASS else f"{mark}, run {state}"


# ---- report inputs that live outside RunSummary (built by fleet/, rendered by reports/) ---------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSummary:
    """One link (a pair of endpoints) after judgement, as the reports show it."""

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
    """Everything a report can show beyond the run itself; all of it optional.

    The link probes, the topology inference and the fleet history are built in fleet/; every report
    renders without them and adds the matching section (link heatmap, topology, trend lines, JUnit
    link testcases) when they are given."""

    links: list[LinkSummary] = field(default_factory=list)
    topology: Topology | None = None
    history: dict[str, list[HistoryPoint]] = field(default_factory=dict)
    """Device UUID -> its earlier runs, oldest first."""
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    """Device UUID -> what discovery found (serial, driver, libraries): the OCP report's DUT info."""
    min_gap: float | None = None
    """The run's --min-gap (throughput shortfall against peers that counts as slow), when known."""

    @classmethod
    def from_links(cls, s: RunSummary) -> ReportExtras:
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
        return cls(links=links, topology=topology)
