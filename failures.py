"""Failure codes: every failure chipcheck reports carries a code, a severity and a recommended action.

Modelled on DCGM's diagnostic error codes: automation (a Slurm health check, a Kubernetes node
controller, a ticketing bot) acts on the code, never on the wording of a reason. A code is stable
once published; new failure kinds get new codes.

Plain data over `results` types only, so reports and fleet code can both use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .results import ErrorKind, Oracle, ProbeSummary, Verdict


class Severity(enum.IntEnum):
    """How bad it is for a training job on this device; higher is worse."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()


class Action(enum.StrEnum):
    """What an operator (or automation) should do."""

    MONITOR = "monitor"
    RETEST = "retest"
    DRAIN = "drain"
    REPLACE_CHIP = "replace_chip"
    RESEAT_LINK = "reseat_link"

    @property
    def out_of_service(self) -> bool:
        """Whether the host must stop taking jobs until the action is done."""
        return self in (Action.DRAIN, Action.REPLACE_CHIP, Action.RESEAT_LINK)


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureCode:
    code: str
    """Stable identifier, e.g. CC-SDC-001."""
    severity: Severity
    action: Action
    title: str
    """One line: what the code means."""

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity.label, "action": self.action.value, "title": self.title}


def _c(code: str, severity: Severity, action: Action, title: str) -> FailureCode:
    return FailureCode(code=code, severity=severity, action=action, title=title)


# Silent data corruption: an oracle with a known right answer fired -> the chip computes wrong bits.
SDC_EXACT = _c("CC-SDC-001", Severity.CRITICAL, Action.REPLACE_CHIP, "wrong bits against an exact or algebraic oracle")
SDC_CONSENSUS = _c("CC-SDC-002", Severity.CRITICAL, Action.DRAIN,
                   "output bits differ from the fingerprint peers' consensus")
SDC_NONFINITE = _c("CC-SDC-003", Severity.CRITICAL, Action.REPLACE_CHIP, "NaN or infinity from finite inputs")
SDC_REPEAT = _c("CC-SDC-004", Severity.HIGH, Action.DRAIN, "the same call gave different bits (every repeat)")
SDC_REFERENCE = _c("CC-SDC-005", Severity.HIGH, Action.DRAIN, "systematic error against the fp64 reference")
FLAKY = _c("CC-FLK-001", Severity.HIGH, Action.DRAIN, "intermittent wrong results (some repeats)")
SLOW = _c("CC-PERF-001", Severity.MEDIUM, Action.RETEST, "throughput below its fingerprint peers")
SUSPECT = _c("CC-SUS-001", Severity.MEDIUM, Action.RETEST,
             "member of a group holding a fault no check could pin to one device: retest the group")
ERR_TIMEOUT = _c("CC-ERR-001", Severity.HIGH, Action.DRAIN, "probe hung past its watchdog")
ERR_CRASH = _c("CC-ERR-002", Severity.HIGH, Action.RETEST, "worker crashed or never reported")
ERR_DEVICE_LOST = _c("CC-ERR-003", Severity.CRITICAL, Action.DRAIN, "device lost (fell off the bus, reset)")
ERR_SOFTWARE = _c("CC-ERR-004", Severity.LOW, Action.MONITOR,
                  "probe could not run (configuration, unsupported, exception): not the chip's fault")
LINK_WRONG = _c("CC-LNK-001", Severity.CRITICAL, Action.RESEAT_LINK, "link corrupts payload bits")
LINK_SLOW = _c("CC-LNK-002", Severity.MEDIUM, Action.RESEAT_LINK, "link slower than its peers")
LINK_ERROR = _c("CC-LNK-003", Severity.HIGH, Action.RESEAT_LINK, "link could not be measured")
LEMON = _c("CC-LEM-001", Severity.CRITICAL, Action.REPLACE_CHIP, "wrong results recur across runs (a lemon chip)")
TREND_SLOWER = _c("CC-TRD-001", Severity.MEDIUM, Action.RETEST, "throughput fell against the device's own history")
TREND_FLAKY = _c("CC-TRD-002", Severity.HIGH, Action.DRAIN, "device turned flaky over recent runs")
TREND_LINK = _c("CC-TRD-003", Severity.MEDIUM, Action.RESEAT_LINK, "link got slower against its own history")

ALL: tuple[FailureCode, ...] = (SDC_EXACT, SDC_CONSENSUS, SDC_NONFINITE, SDC_REPEAT, SDC_REFERENCE, FLAKY, SLOW, SUSPECT,
                                ERR_TIMEOUT, ERR_CRASH, ERR_DEVICE_LOST, ERR_SOFTWARE, LINK_WRONG, LINK_SLOW,
                                LINK_ERROR, LEMON, TREND_SLOWER, TREND_FLAKY, TREND_LINK)

_BY_ORACLE = {Oracle.EXACT: SDC_EXACT, Oracle.FREIVALDS: SDC_EXACT, Oracle.NONFINITE: SDC_NONFINITE,
              Oracle.REPEAT: SDC_REPEAT, Oracle.CONSENSUS: SDC_CONSENSUS, Oracle.REFERENCE: SDC_REFERENCE,
              Oracle.CROSS_BACKEND: SDC_CONSENSUS, Oracle.REPLICA: SDC_CONSENSUS}
_BY_ERROR = {ErrorKind.TIMEOUT: ERR_TIMEOUT, ErrorKind.CRASH: ERR_CRASH, ErrorKind.DEVICE_LOST: ERR_DEVICE_LOST,
             ErrorKind.INVALID_CONFIG: ERR_SOFTWARE, ErrorKind.UNSUPPORTED: ERR_SOFTWARE,
             ErrorKind.EXCEPTION: ERR_SOFTWARE,
             ErrorKind.PEER_LOST: ERR_SOFTWARE}  # not run because another rank was lost: never this chip's
_BY_LINK = {Verdict.WRONG: LINK_WRONG, Verdict.FLAKY: LINK_WRONG, Verdict.SLOW: LINK_SLOW, Verdict.ERROR: LINK_ERROR}


def worst(codes: list[FailureCode]) -> FailureCode | None:
    """The most severe code (first listed wins a tie); None for none."""
    return max(codes, key=lambda c: c.severity, default=None)


def for_mismatch_oracles(oracles: list[Oracle]) -> FailureCode:
    return worst([_BY_ORACLE[o] for o in oracles]) or SDC_EXACT


def for_probe(p: ProbeSummary) -> FailureCode | None:
    """The code of one probe on one device after judgement (None when it passed).

    The code follows the probe's verdict; within it, the oracle or error kind that caused it picks
    the code (an exact-oracle failure outranks a consensus one: it needs no peers to be believed).
    """
    if p.verdict is Verdict.PASS:
        return None
    cases = p.cases
    if p.verdict is Verdict.SLOW:
        return SLOW
    if p.verdict is Verdict.FLAKY:
        return FLAKY
    if p.verdict is Verdict.SUSPECT:
        return SUSPECT
    if p.verdict is Verdict.ERROR:
        kinds = [c.error.kind for c in cases if c.error is not None]
        return worst([_BY_ERROR[k] for k in kinds]) or ERR_CRASH
    # wrong: the oracles that fired locally, else the fleet's consensus (or a link endpoint)
    oracles = [m.oracle for c in cases if c.verdict is Verdict.WRONG for m in c.mismatches]
    if oracles:
        return for_mismatch_oracles(oracles)
    if p.probe == "links":
        return LINK_WRONG
    return SDC_CONSENSUS


def for_link(verdict: Verdict) -> FailureCode | None:
    """The code of one judged link direction (None when it passed)."""
    return _BY_LINK.get(verdict)
