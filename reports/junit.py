"""The run as JUnit XML: one testcase per device x probe (and per link), for CI systems.

Shape (what Jenkins' junit/xunit plugins and GitLab's test reports read):

    <testsuites name="chipcheck" tests failures errors skipped time>
      <testsuite name="chipcheck.<probe>" tests failures errors skipped time timestamp hostname>
        <properties><property name="run_id" value=.../> ...</properties>
        <testcase classname="chipcheck.<probe>" name="<host> <device>" time="0.000">
          <failure type="wrong|slow|flaky" message="first reason">every reason and finding</failure>
          | <error type="timeout|crash|..." message="...">...</error>
          <system-out>rank, uuid, fingerprint, key metrics</system-out>
        </testcase>

`wrong`, `slow` and `flaky` are failures (the chip is bad); `error` is an error (the probe could not
run), so CI keeps the two apart exactly as chipcheck does. A run cut short adds an error testcase
`chipcheck.run` "run reached its end" listing the cases it never ran. Times use the surefire pattern (seconds,
three decimals) that Jenkins' schema requires.
"""

from __future__ import annotations

import datetime as _dt
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass

from ..results import RunStatus, RunSummary, Verdict
from . import view
from .extras import LinkSummary, ReportExtras

# XML 1.0 forbids most control characters; a worker's log tail can carry them (ANSI colours).
_BAD_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class _Case:
    """One testcase before it becomes XML."""

    classname: str
    name: str
    verdict: Verdict
    kind: str
    """The failure/error `type` attribute: the verdict, or the error kind for `error`."""
    message: str
    body: str
    out: str
    seconds: float = 0.0


def render(s: RunSummary, extras: ReportExtras | None = None) -> str:
    """The JUnit XML document (UTF-8, with declaration)."""
    extras = extras or ReportExtras()
    suites: dict[str, list[_Case]] = defaultdict(list)
    for c in _device_cases(s):
        suites[c.classname].append(c)
    for c in (_link_case(lk) for lk in extras.links):
        suites[c.classname].append(c)
    if s.status is not RunStatus.COMPLETE:  # a run cut short is an error of its own: CI never shows it green
        missing = f"{len(s.missing)} planned case(s) have no result" if s.missing else "what it had left is unknown"
        suites["chipcheck.run"].append(_Case(
            classname="chipcheck.run", name="run reached its end", verdict=Verdict.ERROR, kind=s.status.value,
            message=f"run {s.status.value}: {missing}; the verdict covers only what was measured",
            body="\n".join(s.missing), out=""))
    root = ET.Element("testsuites", name="chipcheck")
    stamp = _dt.datetime.fromtimestamp(s.started or 0, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    hosts = sorted({d.host for d in s.devices})
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for suite_name, cases in suites.items():
        failures = sum(1 for c in cases if c.verdict not in (Verdict.PASS, Verdict.ERROR))
        errors = sum(1 for c in cases if c.verdict is Verdict.ERROR)
        suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(cases)), failures=str(failures),
                              errors=str(errors), skipped="0", time=_secs(sum(c.seconds for c in cases)),
                              timestamp=stamp, hostname=hosts[0] if len(hosts) == 1 else "fleet")
        props = ET.SubElement(suite, "properties")
        for k, v in (("run_id", s.run_id), ("profile", s.profile), ("seed", str(s.seed)),
                     ("verdict", s.verdict.value), ("status", s.status.value)):
            ET.SubElement(props, "property", name=k, value=v)
        for c in cases:
            _testcase(suite, c)
        totals["tests"] += len(cases)
        totals["failures"] += failures
        totals["errors"] += errors
    root.set("tests", str(totals["tests"]))
    root.set("failures", str(totals["failures"]))
    root.set("errors", str(totals["errors"]))
    root.set("skipped", "0")
    root.set("time", _secs(max(0.0, (s.ended or 0) - (s.started or 0))))
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _device_cases(s: RunSummary) -> list[_Case]:
    cards = {(c.rank, c.probe): c for c in view.build(s).cards}
    out = []
    for d in s.devices:
        name = f"{d.host} {d.device}"
        ident = f"rank={d.rank} uuid={d.uuid} fingerprint={d.fingerprint}"
        if not d.probes:  # the device never reported: still one failing testcase, never silence
            out.append(_Case(classname="chipcheck.device", name=name, verdict=d.verdict, kind=d.verdict.value,
                             message="no probe reported a result for this device", body="", out=ident))
            continue
        for p in d.probes:
            card = cards.get((d.rank, p.probe))
            kind, message, body = p.verdict.value, "", ""
            if card is not None:
                errors = [c.error for c in card.cases if c.error is not None]
                if p.verdict is Verdict.ERROR and errors:
                    kind = errors[0].kind.value
                message = card.reasons[0] if card.reasons else ", ".join(card.modes)
                body = _diagnosis(card)
            speed = " ".join(f"{k}={v:.6g}" for k, v in sorted(p.metrics.items())
                             if isinstance(v, float) and k.endswith((":tflops_best", ":ratio_to_peers", ":ratio")))
            out.append(_Case(classname=f"chipcheck.{p.probe}", name=name, verdict=p.verdict, kind=kind,
                             message=message, body=body, out=f"{ident}\n{speed}".strip()))
    return out


def _diagnosis(card: view.FailureCard) -> str:
    """Everything a person needs from the CI page alone: reasons, then each finding in full."""
    lines = [f"{card.verdict.value}: {card.host} {card.device} (rank {card.rank}, uuid {card.uuid}, "
             f"fingerprint {card.fingerprint}) probe {card.probe}", *(f"- {r}" for r in card.reasons)]
    for c in card.cases:
        for m in c.mismatches:
            lines.append(f"  {c.case} [{m.oracle.value}] {m.bad_elements}/{m.total_elements} bad in "
                         f"{c.repeats_bad}/{c.repeats} repeats; first indices {m.first_indices[:8]}; "
                         f"tiles {m.tiles[:8]}; bits {dict(sorted(m.bit_histogram.items()))}; "
                         f"max |err| {m.max_abs_error:.3g}")
    for h in card.histograms:
        lines.append(f"  flipped bits ({h.dtype}): {h.text}")
    return "\n".join(lines)


def _link_case(lk: LinkSummary) -> _Case:
    bw = f"busbw_gbps={lk.busbw_gbps:.6g}" if lk.busbw_gbps is not None else ""
    return _Case(classname="chipcheck.links", name=f"{lk.src} <-> {lk.dst}", verdict=lk.verdict,
                 kind=lk.verdict.value, message=lk.reason or lk.verdict.value, body=lk.reason, out=bw)


def _testcase(suite: ET.Element, c: _Case) -> None:
    tc = ET.SubElement(suite, "testcase", classname=c.classname, name=_clean(c.name), time=_secs(c.seconds))
    if c.verdict is not Verdict.PASS:
        tag = "error" if c.verdict is Verdict.ERROR else "failure"
        el = ET.SubElement(tc, tag, type=c.kind, message=_clean(c.message)[:MESSAGE_CHARS])
        el.text = _clean(c.body or c.message)
    if c.out:
        ET.SubElement(tc, "system-out").text = _clean(c.out)


def _clean(text: str) -> str:
    return _BAD_XML.sub("?", text)


def _secs(x: float) -> str:
    return f"{max(0.0, x):.3f}"
