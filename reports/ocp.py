"""The run as OCP Test & Validation diagnostic output (spec v2, JSON lines), written with `ocptv`.

Fleet tooling ingests hardware diagnostics in this format. The mapping:
- one OCP test run per chipcheck run; its result is PASS only when chipcheck's verdict is `pass`;
- the DUT is the set of devices: one hardware info per device (UUID and fingerprint in the DUT's
  metadata, serial and VBIOS from discovery when known), one software info per driver and library;
- each probe case on each device is a test step: its throughput and correctness counts are
  measurements with the validators chipcheck judged them by, its verdict a diagnosis;
- each fleet judgement (consensus, speed against peers, baseline or history, blame, suspect) is a
  diagnosis too, in the step of the case it is about (or a step of its own for the whole probe);
- each device ends with one step holding its overall verdict; each judged link direction is a step.

A diagnosis's `verdict` is `<probe>-<chipcheck verdict>` (pareto-able, e.g. `matmul-wrong`); its
`type` is PASS for pass, FAIL for wrong / slow / flaky / an error that is the chip's, UNKNOWN for
`suspect` (a group holds a fault no check pinned to one member) and for a probe that could not run
for software reasons (CC-ERR-004). The message starts with the failure code, e.g.
`[CC-SDC-001 critical replace_chip] ...`. Timestamps are the run's own (start, and end for the run
end), so rendering a stored run twice gives the same bytes.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import UTC, datetime
from typing import Any

from .. import failures
from ..failures import FailureCode
from ..results import (
    CaseSummary,
    DeviceInfo,
    DeviceSummary,
    Judgement,
    ProbeSummary,
    RunStatus,
    RunSummary,
    Verdict,
)
from .extras import ReportExtras

TOOL = "chipcheck"
SOFTWARE_FIELDS = ("driver", "cuda", "cudnn", "nccl", "torch", "jax", "rocm", "vbios")
"""Fingerprint fields that name software (a driver, a library, firmware), as DUT software infos."""
_UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "busbw_gbps": "GB/s", "algbw_gbps": "GB/s", "tokens_per_s": "tok/s",
          "latency_us": "us", "time_ms": "ms", "check_ms": "ms", "p50_ms": "ms"}
_lock = threading.Lock()  # ocptv's writer is module-global while a TestRun is created


class _Collect:
    """An ocptv writer that keeps the lines, stamped with the run's own time instead of the clock."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.clock = 0.0

    def write(self, buffer: str) -> None:
        doc = json.loads(buffer)
        doc["timestamp"] = datetime.fromtimestamp(self.clock, tz=UTC).isoformat().replace("+00:00", "Z")
        self.lines.append(json.dumps(doc, sort_keys=False))


def diagnosis_type(verdict: Verdict, code: FailureCode | None) -> str:
    """The OCP diagnosis type (PASS / FAIL / UNKNOWN) of a chipcheck verdict and its failure code."""
    if verdict is Verdict.PASS:
        return "PASS"
    if verdict is Verdict.SUSPECT or code is failures.ERR_SOFTWARE:
        return "UNKNOWN"
    return "FAIL"


def render(s: RunSummary, extras: ReportExtras | None = None, *, version: str = "") -> str:
    """The OCP output of `s`: one JSON object per line (schemaVersion first, testRunEnd last)."""
    import ocptv.output as tv
    from ocptv.output.config import get_config

    extras = extras or ReportExtras()
    out = _Collect()
    out.clock = s.started
    with _lock:
        before = get_config().writer
        tv.config(writer=out)  # type: ignore[arg-type]
        try:
            run = tv.TestRun(name=TOOL, version=version or _version(), command_line=_command(s),
                             parameters={"run_id": s.run_id, "profile": s.profile, "seed": s.seed})
        finally:
            tv.config(writer=before)
    dut, hw = _dut(tv, s, extras)
    run.start(dut=dut)
    for finding in s.findings:
        run.add_log(tv.LogSeverity.WARNING, f"finding: {finding}", source_location=None)
    for d in s.devices:
        for p in d.probes:
            _probe_steps(tv, run, d, p, hw.get(d.rank), extras)
        _device_step(tv, run, d, hw.get(d.rank))
    _link_steps(tv, run, s, hw)
    out.clock = s.ended
    # a run cut short ends in ERROR: its result is FAIL for what it found, else not applicable, never PASS
    done = s.status is RunStatus.COMPLETE
    result = (tv.TestResult.FAIL if s.verdict is not Verdict.PASS
              else tv.TestResult.PASS if done else tv.TestResult.NOT_APPLICABLE)
    run.end(status=tv.TestStatus.COMPLETE if done else tv.TestStatus.ERROR, result=result)
    return "\n".join(out.lines) + "\n"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version(TOOL)
    except metadata.PackageNotFoundError:
        return "unknown"


def _command(s: RunSummary) -> str:
    return f"chipcheck run --profile {s.profile} --seed {s.seed}"


def _dut(tv: Any, s: RunSummary, extras: ReportExtras) -> tuple[Any, dict[int, Any]]:
    """The DUT: every device a hardware info, every distinct driver/library a software info."""
    hosts = sorted({d.host for d in s.devices})
    meta = tv.Metadata(run_id=s.run_id, devices=[])
    dut = tv.Dut(id=",".join(hosts) or s.run_id, name=f"{TOOL} run {s.run_id}", metadata=meta)
    hw: dict[int, Any] = {}
    seen: set[tuple[str, str, str]] = set()
    for d in s.devices:
        info: DeviceInfo | None = extras.devices.get(d.uuid)
        fields = info.fingerprint_fields if info else {}
        h = dut.add_hardware_info(name=info.name if info else d.device, location=f"{d.host} {d.device}",
                                  serial_no=_known(fields.get("serial")), version=_known(fields.get("vbios")),
                                  computer_system=d.host)
        hw[d.rank] = h
        meta["devices"].append({"hardwareInfoId": h.to_spec().id, "rank": d.rank, "device": d.device,
                                "host": d.host, "uuid": d.uuid, "fingerprint": d.fingerprint,
                                **({"fingerprint_fields": dict(fields)} if fields else {})})
        for key in SOFTWARE_FIELDS:
            v = _known(fields.get(key))
            if v is None or (d.host, key, v) in seen:
                continue
            seen.add((d.host, key, v))
            kind = tv.SoftwareType.FIRMWARE if key == "vbios" else (
                tv.SoftwareType.SYSTEM if key == "driver" else tv.SoftwareType.APPLICATION)
            dut.add_software_info(name=key, type=kind, version=v, computer_system=d.host)
    return dut, hw


def _known(v: str | None) -> str | None:
    return v if v and v not in ("unknown", "n/a") else None


def _code_of(probe: str, verdict: Verdict, cases: list[CaseSummary]) -> FailureCode | None:
    """The failure code of one case or judgement, by the same rule as the probe's (failures.for_probe)."""
    return failures.for_probe(ProbeSummary(probe=probe, verdict=verdict, metrics={}, cases=cases))


def _message(code: FailureCode | None, text: str) -> str:
    head = f"[{code.code} {code.severity.label} {code.action.value}] " if code else ""
    return head + (text or (code.title if code else "ok"))


def _diagnose(tv: Any, step: Any, probe: str, verdict: Verdict, code: FailureCode | None, text: str,
              hw: Any) -> None:
    step.add_diagnosis(tv.DiagnosisType(diagnosis_type(verdict, code)), verdict=f"{probe}-{verdict.value}",
                       message=_message(code, text), hardware_info=hw, source_location=None)


def _measure(tv: Any, step: Any, name: str, value: float, hw: Any, validators: list[Any] | None = None) -> None:
    if not math.isfinite(value):
        return  # JSON has no NaN; a non-finite speed is an error result, said by its diagnosis
    step.add_measurement(name=name, value=value, unit=_UNITS.get(name), validators=validators, hardware_info=hw)


def _probe_steps(tv: Any, run: Any, d: DeviceSummary, p: ProbeSummary, hw: Any, extras: ReportExtras) -> None:
    """One step per case of `p` on `d`, plus one for judgements about the whole probe."""
    names = [c.case for c in p.cases]
    for c in p.cases:
        step = run.add_step(f"{d.host} {d.device} {p.probe} {c.case}")
        step.start()
        for key, value in p.metrics.items():
            case, _, metric = key.rpartition(":")
            if case == c.case:
                _measure(tv, step, metric, float(value), hw)
        zero = [tv.Validator(type=tv.ValidatorType.EQUAL, value=0, name="every repeat bit-exact")]
        if c.repeats:
            _measure(tv, step, "repeats_bad", float(c.repeats_bad), hw, zero)
        for m in c.mismatches:
            _measure(tv, step, f"bad_elements:{m.tensor}", float(m.bad_elements), hw,
                     [tv.Validator(type=tv.ValidatorType.EQUAL, value=0, name=f"{m.oracle.value} oracle")])
        if c.error is not None:
            step.add_error(symptom=c.error.kind.value, message=c.error.message, source_location=None)
        why = next((r for r in p.reasons if f" {p.probe} {c.case}:" in r), "")
        _diagnose(tv, step, p.probe, c.verdict, _code_of(p.probe, c.verdict, [c]), why, hw)
        for j in p.fleet:
            if j.case == c.case:
                _judgement(tv, step, p.probe, j, hw, extras)
        step.end(status=tv.TestStatus.ERROR if c.error is not None else tv.TestStatus.COMPLETE)
    rest = [j for j in p.fleet if j.case not in names]
    if rest:
        step = run.add_step(f"{d.host} {d.device} {p.probe} fleet judgement")
        step.start()
        for j in rest:
            _judgement(tv, step, p.probe, j, hw, extras)
        step.end(status=tv.TestStatus.COMPLETE)


def _judgement(tv: Any, step: Any, probe: str, j: Judgement, hw: Any, extras: ReportExtras) -> None:
    """A fleet judgement: its numbers as measurements (speed against peers validated by --min-gap), then
    its diagnosis."""
    for key, value in j.metrics.items():
        validators = None
        if key == "ratio_to_peers" and extras.min_gap is not None:
            validators = [tv.Validator(type=tv.ValidatorType.GREATER_THAN, value=1.0 - extras.min_gap,
                                       name="throughput against the fingerprint peers' median (--min-gap)")]
        _measure(tv, step, f"{j.case}:{key}", float(value), hw, validators)
    _diagnose(tv, step, probe, j.verdict, _code_of(probe, j.verdict, []), j.reason, hw)


def _device_step(tv: Any, run: Any, d: DeviceSummary, hw: Any) -> None:
    """The device's overall verdict, with its worst failure code."""
    step = run.add_step(f"{d.host} {d.device} verdict")
    step.start()
    codes = [c for c in (failures.for_probe(p) for p in d.probes) if c is not None]
    code = failures.worst(codes)
    failing = ", ".join(f"{p.probe} {p.verdict.value}" for p in d.probes if p.verdict is not Verdict.PASS)
    text = f"{d.host} {d.device} uuid={d.uuid}: " + (failing or "every probe passed")
    _diagnose(tv, step, "device", d.verdict, code, text, hw)
    step.end(status=tv.TestStatus.COMPLETE)


def _link_steps(tv: Any, run: Any, s: RunSummary, hw: dict[int, Any]) -> None:
    if s.links is None:
        return
    label = {d.rank: f"{d.host} {d.device}" for d in s.devices}
    for x in s.links.links:
        step = run.add_step(f"link {label.get(x.src, x.src)} -> {label.get(x.dst, x.dst)}")
        step.start()
        if x.gbps is not None:
            _measure(tv, step, "gbps", float(x.gbps), hw.get(x.src))
        if x.latency_us is not None:
            _measure(tv, step, "latency_us", float(x.latency_us), hw.get(x.src))
        _measure(tv, step, "bad_bytes", float(x.bad_bytes), hw.get(x.src),
                 [tv.Validator(type=tv.ValidatorType.EQUAL, value=0, name="payload bits intact")])
        _diagnose(tv, step, "link", x.verdict, failures.for_link(x.verdict), x.reason, hw.get(x.src))
        step.end(status=tv.TestStatus.COMPLETE)
