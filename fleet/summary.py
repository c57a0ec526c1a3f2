"""Fold case results and fleet judgements into one verdict per device and probe."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from ..results import (
    CaseSummary,
    ConsensusGroup,
    DeviceInfo,
    DeviceSummary,
    Judgement,
    LinksSummary,
    ProbeResult,
    ProbeSummary,
    RunSummary,
    Verdict,
)


def summarize(run_id: str, devices: dict[int, DeviceInfo], results: list[ProbeResult], judgements: list[Judgement],
              groups: list[ConsensusGroup], *, profile: str, seed: int, started: float, ended: float,
              links: LinksSummary | None = None, findings: list[str] | None = None,
              exonerate: set[tuple[int, str, str]] | None = None, fleet_verdict: Verdict = Verdict.PASS,
              speed_metrics: Mapping[str, str] | None = None) -> RunSummary:
    """`exonerate`: (rank, probe, case) whose local verdict is not the chip's fault (a library wrong
    on every device): reported as a finding, not held against the device. `speed_metrics`: probe ->
    the metric the speed judge reads it by (default: the registry's), carried by each ProbeSummary
    so the reports rank it on that metric."""
    exonerate = exonerate or set()
    if speed_metrics is None:
        speed_metrics = registry_speed_metrics()
    by_dev: dict[int, dict[str, list[ProbeResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_dev[r.rank][r.probe].append(r)
    judged: dict[int, dict[str, list[Judgement]]] = defaultdict(lambda: defaultdict(list))
    for j in judgements:
        judged[j.rank][j.probe].append(j)
    out = []
    for rank, info in sorted(devices.items()):
        probes = []
        names = list(dict.fromkeys(list(by_dev[rank]) + list(judged[rank])))
        for name in names:
            rs, js = by_dev[rank][name], judged[rank][name]
            verdict = Verdict.worst([r.held for r in rs if (rank, r.probe, r.case) not in exonerate]
                                    + [j.verdict for j in js])
            metrics: dict[str, float] = {}
            for r in rs:
                for k, v in r.metrics.items():
                    metrics[f"{r.case}:{k}"] = v
            for j in js:
                for k, v in j.metrics.items():
                    metrics[f"{j.case}:{k}"] = v
            probes.append(ProbeSummary(probe=name, verdict=verdict, metrics=metrics, cases=_cases(rs), fleet=list(js),
                                       reasons=_reasons(rs) + [j.reason for j in js],
                                       speed_metric=speed_metrics.get(name, "")))
        verdict = Verdict.worst([p.verdict for p in probes]) if probes else Verdict.ERROR
        out.append(DeviceSummary(rank=rank, device=info.label, host=info.host, uuid=info.uuid,
                                 fingerprint=info.fingerprint, verdict=verdict, probes=probes))
    overall = Verdict.worst([d.verdict for d in out] + ([x.verdict for x in links.links] if links else [])
                            + [fleet_verdict])
    return RunSummary(run_id=run_id, verdict=overall, started=started, ended=ended, profile=profile, seed=seed,
                      devices=out, groups=list(groups), links=links, findings=list(findings or []))


def registry_speed_metrics() -> dict[str, str]:
    """Each registered probe's speed metric (empty where it is not judged per device on speed)."""
    from .judge.verdicts import speed_tables

    return speed_tables()[0]


def _cases(rs: list[ProbeResult]) -> list[CaseSummary]:
    return [CaseSummary(case=r.case, verdict=r.held, repeats=r.repeats, repeats_bad=r.repeats_bad,
                        params=r.params,
                        # shared evidence only: the fleet judgement says whose
                        local_verdict=r.verdict if r.held is not r.verdict else None,
                        mismatches=list(r.mismatches), error=r.error, output_hash=r.output_hash)
            for r in rs]


def _reasons(rs: list[ProbeResult], named: int = 3) -> list[str]:
    """Each case's explanation, in order; an error several cases share ("not run: peer rank 2 lost") is
    said once, naming the cases, where one line each buried the device's own findings."""
    shared: dict[tuple[str, str], list[ProbeResult]] = {}
    order: list[str | tuple[str, str]] = []
    for r in rs:
        if r.error is None:
            if why := explain(r):
                order.append(why)
            continue
        key = (r.error.kind.value, r.error.message)
        if key not in shared:
            order.append(key)
        shared.setdefault(key, []).append(r)
    out = []
    for item in order:
        if isinstance(item, str):
            out.append(item)
            continue
        group = shared[item]
        if len(group) == 1:
            out.append(explain(group[0]))
            continue
        r = group[0]
        cases = ", ".join(g.case for g in group[:named])
        more = f" and {len(group) - named} more ({len(group)} cases)" if len(group) > named else ""
        out.append(f"{r.host} {r.device} {r.probe} {cases}{more}: error ({item[0]}): {item[1]}")
    return out


def bit_spans(bits: Iterable[int]) -> str:
    """Bit indices as runs, "0-26,31": a flip that scrambles a whole word would otherwise list 32 numbers."""
    out: list[str] = []
    for b in sorted(set(bits)):
        if out and out[-1].rpartition("-")[2] == str(b - 1):
            out[-1] = f"{out[-1].partition('-')[0]}-{b}"
        else:
            out.append(str(b))
    return ",".join(out)


def explain(r: ProbeResult) -> str:
    """One line a person can act on: what went wrong in this case, on which device.

    A case whose evidence is shared with other ranks explains nothing about this device on its own:
    the fleet judgement (fleet.judge.blame) says whose it is. Identical findings (a replica check
    that fails at every step) are said once, with how often.
    """
    where = f"{r.host} {r.device} {r.probe} {r.case}"
    if r.error is not None:
        return f"{where}: error ({r.error.kind.value}): {r.error.message}"
    if r.held is Verdict.PASS:
        return ""
    parts: dict[str, int] = {}
    for m in r.mismatches:
        if m.first_indices or m.bit_histogram:
            bits = bit_spans(m.bit_histogram) or "-"
            first = m.first_indices[0] if m.first_indices else "?"
            val = f" expected {m.expected[0]:.6g} got {m.actual[0]:.6g}" if m.expected and m.actual else ""
            line = (f"{m.oracle.value}: {m.bad_elements}/{m.total_elements} elements of {m.tensor} bad, "
                    f"first at {first}{val}, flipped bits [{bits}]")
        else:  # a checksum-level finding (replicas, gradients): the note says what and who
            line = f"{m.oracle.value}: {m.tensor}: {_strip_step(m.note) or 'differs'}"
        parts[line] = parts.get(line, 0) + 1
    said = "; ".join(line + (f" (x{n})" if n > 1 else "") for line, n in parts.items())
    if r.repeats_bad:
        how = f"{r.verdict.value} in {r.repeats_bad} of {r.repeats} repeats"
    elif r.verdict is Verdict.FLAKY:  # no repeat failed a check, yet they disagree among themselves
        how = f"flaky: its {r.repeats} repeats differ bit for bit, none failed a check of its own"
    else:
        how = r.verdict.value
    return f"{where}: {how}; " + said


def _strip_step(note: str) -> str:
    """A note without its trailing `step=N`, so one finding repeated at every step reads once."""
    head, sep, tail = note.rpartition(" step=")
    return head if sep and tail.isdigit() else note
