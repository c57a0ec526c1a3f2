"""The terminal report: a table per device, then what exactly went wrong, then the fleet line."""

from __future__ import annotations

from ..results import RunStatus, RunSummary, Verdict

MAX_REASONS = 4
# The headline speed of each kind of probe, with its unit.
_HEADLINE = (("tflops", "TFLOP/s"), ("busbw_gbps", "GB/s bus"), ("gbps", "GB/s"), ("tokens_per_s", "tok/s"))


def _speed(metrics: dict[str, float], case: str) -> str:
    for key, unit in _HEADLINE:
        v = metrics.get(f"{case}:{key}")
        if v is not None:
            return f"{v:11.3f} {unit:<8}"
    return " " * 20


def render(s: RunSummary) -> str:
    lines = [f"chipcheck run {s.run_id}  profile={s.profile} seed={s.seed}  {len(s.devices)} device(s)", ""]
    for d in s.devices:
        lines.append(f"rank {d.rank}  {d.host} {d.device}  uuid={d.uuid}  fingerprint={d.fingerprint}  "
                     f"=> {d.verdict.upper()}")
        for p in d.probes:
            for c in p.cases:
                lines.append(f"    {p.probe:<11} {c.case:<24} {c.verdict.value:<6} {_speed(p.metrics, c.case)}  "
                             f"repeats {c.repeats_bad}/{c.repeats} bad")
            reasons = p.reasons
            for why in reasons[:MAX_REASONS]:
                lines.append(f"    ! {why}")
            if len(reasons) > MAX_REASONS:
                lines.append(f"    ! (+{len(reasons) - MAX_REASONS} more; see --json or the store)")
        lines.append("")
    return "\n".join(lines + _footer(s))


def render_compact(s: RunSummary) -> str:
    """The calm terminal's summary: one row per device, then only the failing probes' findings in full."""
    from .. import failures

    lines = [f"chipcheck run {s.run_id}  profile={s.profile} seed={s.seed}  {len(s.devices)} device(s)", "",
             f"{'rank':>4}  {'host':<14} {'device':<8} {'verdict':<8} {'probes':<8} {'code':<11} uuid"]
    for d in s.devices:
        ok = sum(1 for p in d.probes if p.verdict is Verdict.PASS)
        code = failures.worst([c for c in (failures.for_probe(p) for p in d.probes) if c is not None])
        lines.append(f"{d.rank:>4}  {d.host:<14} {d.device:<8} {d.verdict.upper():<8} {f'{ok}/{len(d.probes)}':<8} "
                     f"{code.code if code else '-':<11} {d.uuid}")
    lines.append("")
    for d in s.devices:
        bad = [p for p in d.probes if p.verdict is not Verdict.PASS]
        if not bad:
            continue
        lines.append(f"rank {d.rank}  {d.host} {d.device}  uuid={d.uuid}  fingerprint={d.fingerprint}  "
                     f"=> {d.verdict.upper()}")
        for p in bad:
            code = failures.for_probe(p)
            head = f" {code.code} ({code.severity.label}, {code.action.value})" if code else ""
            lines.append(f"    {p.probe} {p.verdict.value}{head}")
            for why in p.reasons:
                lines.append(f"    ! {why}")
        lines.append("")
    return "\n".join(lines + _footer(s))


def _footer(s: RunSummary) -> list[str]:
    """What the run says beyond its devices: consensus, links, findings, and the verdict line."""
    lines: list[str] = []
    failed = s.failed
    frac = len(failed) / len(s.devices) if s.devices else 0.0
    counts = ", ".join(f"{v.value}={sum(1 for d in s.devices if d.verdict is v)}" for v in Verdict
                       if any(d.verdict is v for d in s.devices))
    for g in s.groups:
        if g.no_majority:
            lines.append(f"consensus: NO MAJORITY for {g.probe} {g.case} among {g.devices} devices "
                         f"of fingerprint {g.fingerprint}")
    if s.links is not None:
        lines += _links(s)
    for f in s.findings:
        lines.append(f"finding: {f}")
    link_part = ""
    if s.links is not None and s.links.links:
        nl = len(s.links.links)
        link_part = f"; {len(s.links.failed)}/{nl} links = {len(s.links.failed) / nl:.1%} failing"
    suspect = f"; {len(s.suspect)} suspect (retest)" if s.suspect else ""
    if s.status is not RunStatus.COMPLETE:
        counts = f"so far: {counts}"
    lines.append(f"verdict: {s.headline}  ({counts}; {len(failed)}/{len(s.devices)} devices = "
                 f"{frac:.1%} failing{suspect}{link_part})")
    return lines


def _links(s: RunSummary) -> list[str]:
    """Bandwidth matrix (small sweeps), the failing links, and the inferred topology."""
    x = s.links
    assert x is not None
    n = len(x.gbps)
    out = [f"links: {len(x.links)} directions measured in {x.rounds} rounds (pairing {x.pairing}); "
           f"{len(x.failed)} failing"]
    if n <= 16:
        out.append("  GB/s   " + "".join(f"{j:>8}" for j in range(n)))
        for i in range(n):
            cells = "".join(f"{v:8.2f}" if v is not None else "       -" for v in x.gbps[i])
            out.append(f"  {i:>4}   {cells}")
    for link in x.failed[:MAX_REASONS * 4]:
        out.append(f"  ! link {link.src}->{link.dst} {link.verdict.value}: {link.reason}")
    if len(x.failed) > MAX_REASONS * 4:
        out.append(f"  ! (+{len(x.failed) - MAX_REASONS * 4} more failing links)")
    if x.topology_text:
        out.append("inferred topology:")
        out += ["  " + line for line in x.topology_text.splitlines()]
    for d in x.disagreements:
        out.append(f"  ! topology: {d}")
    out.append("")
    return out
