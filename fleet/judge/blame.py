"""Who is `wrong`: one blame rule for every multi-rank probe, every path (live, reloaded, ingested).

A bad chip corrupts everything it computes, and its errors travel through collectives into the
other ranks' tensors. So a case's local `wrong` is held against a device only when it rests on
evidence against the device's *own* computation (`Blame.OWN`: a local oracle fired on an output it
computed, it lost a vote with a strict majority, or a recomputation with a tie-breaker named it).
A value every rank of a group holds alike (a global loss, a replica vote with no majority:
`Blame.SHARED`) says that some member is bad, not which. Such a *suspicion* is resolved here:

1. members of the group with evidence of their own anywhere in the run (another case, another
   probe: a chip that corrupts its GEMMs fails the GEMM probe's exact and Freivalds oracles) are
   the culprits; the others are told what they received and from whom, and pass;
2. with no such member, every member is `suspect`, as a named group with the evidence: retest it.

A consensus vote without a strict majority is a suspicion of the same kind (fleet.judge.consensus).

The converse: when every device of a fingerprint computed the same bits and a tolerance oracle (the
float64 reference) fired on all of them alike, no chip is to blame (`systematic`): the finding is
the fleet's (the library's algorithm or the tolerance model), reported once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ...results import CORRUPT, Blame, ConsensusGroup, Judgement, Oracle, ProbeResult, Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspicion:
    """A group known to hold a fault, from one case's shared evidence."""

    probe: str
    case: str
    group: tuple[int, ...]
    evidence: str


def suspicions(results: list[ProbeResult], groups: list[ConsensusGroup]) -> list[Suspicion]:
    """Every group that shared evidence or a vote without a majority leaves under suspicion."""
    found: dict[tuple[str, str, tuple[int, ...]], str] = {}
    for r in results:
        if r.verdict not in CORRUPT or r.own_evidence:
            continue
        for m in r.mismatches:
            group = tuple(sorted(set(m.group) | {r.rank}))
            found.setdefault((r.probe, r.case, group), f"{m.oracle.value} check of {m.tensor}")
    for g in groups:
        if g.no_majority and len(g.dissenters) > 1:
            found.setdefault((g.probe, g.case, tuple(g.dissenters)),
                             f"consensus: no majority among {g.devices} devices of fingerprint {g.fingerprint} "
                             f"({g.agree} agree at most)")
    return [Suspicion(probe=p, case=c, group=grp, evidence=ev) for (p, c, grp), ev in sorted(found.items())]


def culprits(results: list[ProbeResult], judgements: list[Judgement],
             exonerate: set[tuple[int, str, str]]) -> dict[int, list[str]]:
    """Ranks with evidence against their own computation, each with where it was found."""
    where: dict[int, list[str]] = defaultdict(list)
    for r in results:
        if r.own_evidence and (r.rank, r.probe, r.case) not in exonerate:
            oracles = ",".join(dict.fromkeys(m.oracle.value for m in r.mismatches if m.blame is Blame.OWN))
            where[r.rank].append(f"{r.probe} {r.case}" + (f" ({oracles})" if oracles else ""))
    for j in judgements:
        if j.verdict in CORRUPT:
            where[j.rank].append(f"{j.probe} {j.case} (fleet: {j.reason.split(':', 1)[0]})")
    return dict(where)


def resolve(results: list[ProbeResult], judgements: list[Judgement], groups: list[ConsensusGroup],
            exonerate: set[tuple[int, str, str]] | None = None) -> list[Judgement]:
    """Judgements that settle every suspicion: a note for each member that only received bad data
    (verdict PASS: it explains, it does not blame), or `suspect` for every member when no member
    has evidence of its own."""
    guilty = culprits(results, judgements, exonerate or set())
    out: list[Judgement] = []
    for s in suspicions(results, groups):
        named = [r for r in s.group if r in guilty]
        members = ", ".join(str(r) for r in s.group)
        if named:
            proof = "; ".join(f"rank {r}: {guilty[r][0]}" for r in named)
            for r in s.group:
                if r in named:
                    continue
                out.append(Judgement(rank=r, probe=s.probe, case=s.case, verdict=Verdict.PASS, reason=(
                    f"received: {s.probe} {s.case} is bad on ranks [{members}] alike ({s.evidence}); blamed on "
                    f"rank {', '.join(map(str, named))} by its own evidence ({proof}); this rank's own "
                    f"computation checks out")))
        else:
            for r in s.group:
                out.append(Judgement(rank=r, probe=s.probe, case=s.case, verdict=Verdict.SUSPECT, reason=(
                    f"suspect: {s.probe} {s.case}: ranks [{members}] hold a fault no check could pin to one "
                    f"member ({s.evidence}); retest the group")))
    return out


# Oracles whose verdict rests on a modelled tolerance: a deviation every chip shares bit for bit is
# the model's (or the library algorithm's), not any chip's.
_TOLERANCE = frozenset({Oracle.REFERENCE})


@dataclass(frozen=True, slots=True, kw_only=True)
class Systematic:
    """Cases where every device of a fingerprint computed the same bits and the same tolerance
    oracle fired on all of them: reported once for the fleet, held against no chip."""

    findings: list[str]
    exonerate: set[tuple[int, str, str]]


def systematic(results: list[ProbeResult]) -> Systematic:
    """A tolerance oracle that fires identically on >= 2 devices whose output bits all agree."""
    groups: dict[tuple[str, str, str], list[ProbeResult]] = defaultdict(list)
    for r in results:
        if r.error is None:
            groups[(r.fingerprint, r.probe, r.case)].append(r)
    findings, exonerate = [], set()
    for (fp, probe, case), rs in sorted(groups.items()):
        first = rs[0]
        fired = {(m.oracle, m.tensor, m.bad_elements) for m in first.mismatches}
        if (len(rs) < 2 or first.verdict not in CORRUPT or not first.output_hash or not fired
                or any(o not in _TOLERANCE for o, _, _ in fired)):
            continue
        if all(r.output_hash == first.output_hash and r.verdict is first.verdict
               and {(m.oracle, m.tensor, m.bad_elements) for m in r.mismatches} == fired for r in rs):
            what = ", ".join(f"{o.value} on {t}: {n} elements" for o, t, n in sorted(fired))
            findings.append(f"{probe} {case} (fingerprint {fp}): all {len(rs)} devices computed identical bits and "
                            f"deviate identically from the float64 reference ({what}): systematic (the library's "
                            f"algorithm or chipcheck's tolerance model), not a chip; held against no device")
            exonerate |= {(r.rank, probe, case) for r in rs}
    return Systematic(findings=findings, exonerate=exonerate)
