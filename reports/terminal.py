"""The terminal report: a table per device, then what exactly went wrong, then the fleet line."""

from __future__ import annotations

from ..results import RunSummary, Verdict

_MARK = {Verdict.PASS: "PASS", Verdict.SLOW: "SLOW", Verdict.FLAKY: "FLAKY", Verdict.WRONG: "WRONG",
         Verdict.ERROR: "ERROR"}


def render(s: RunSummary) -> str:
    lines = [f"chipcheck run {s.run_id}  profile={s.profile} seed={s.seed}  {len(s.devices)} device(s)", ""]
    for d in s.devices:
        lines.append(f"rank {d.rank}  {d.host} {d.device}  uuid={d.uuid}  fingerprint={d.fingerprint}  "
                     f"=> {_MARK[d.verdict]}")
        for p in d.probes:
            cases = p.details.get("cases", [])
            for c in cases:
                m = p.metrics
                tf = m.get(f"{c['case']}:tflops")
                ms = m.get(f"{c['case']}:time_ms")
                speed = f"{tf:9.3f} TFLOP/s {ms:9.2f} ms" if tf is not None and ms is not None else " " * 29
                lines.append(f"    {p.probe:<8} {c['case']:<24} {c['verdict']:<6} {speed}  "
                             f"repeats {c['repeats_bad']}/{c['repeats']} bad")
            for why in p.details.get("reasons", []):
                lines.append(f"    ! {why}")
        lines.append("")
    failed = s.failed
    frac = len(failed) / len(s.devices) if s.devices else 0.0
    counts = ", ".join(f"{v.value}={sum(1 for d in s.devices if d.verdict is v)}" for v in Verdict
                       if any(d.verdict is v for d in s.devices))
    for g in s.groups:
        if g.no_majority:
            lines.append(f"consensus: NO MAJORITY for {g.probe} {g.case} among {g.devices} devices "
                         f"of fingerprint {g.fingerprint}")
    lines.append(f"verdict: {_MARK[s.verdict]}  ({counts}; {len(failed)}/{len(s.devices)} devices = "
                 f"{frac:.1%} failing)")
    return "\n".join(lines)
