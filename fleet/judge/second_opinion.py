"""The second opinion: when a chip's library GEMM and an independent kernel disagree, whose fault?

Devices of one fingerprint run the same library on the same inputs (probes/xgemm.py measures
the disagreement): a library bug disagrees on all of them; a chip fault on the chips that have it.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass

from ...results import Judgement, ProbeResult, Verdict


class Culprit(enum.StrEnum):
    NONE = "none"          # the library and the independent kernel agree everywhere
    CHIP = "chip"          # they disagree on some chips only: those chips are wrong
    LIBRARY = "library"    # they disagree on every chip (two or more): the library is wrong
    UNKNOWN = "unknown"    # one chip, and it disagrees: chip or library cannot be told apart


@dataclass(frozen=True, slots=True)
class Finding:
    culprit: Culprit
    ranks: tuple[int, ...]  # the disagreeing ranks


def culprit(disagrees: dict[int, bool]) -> Finding:
    """Who is wrong, from whether each rank's library and independent GEMM disagreed.

    Devices of one fingerprint run the same library on the same inputs: a library bug
    disagrees on all of them; a chip fault on the chips that have it.
    """
    bad = tuple(sorted(r for r, d in disagrees.items() if d))
    if not bad:
        return Finding(Culprit.NONE, ())
    if len(bad) < len(disagrees):
        return Finding(Culprit.CHIP, bad)
    return Finding(Culprit.LIBRARY if len(bad) >= 2 else Culprit.UNKNOWN, bad)


def second_opinion_findings(results: list[ProbeResult]) -> tuple[list[Judgement], list[tuple[str, str, Finding]]]:
    """Fleet helper: per (fingerprint, case) of the xgemm probe, chips to call wrong and library findings.

    Returns (judgements: `wrong` for the disagreeing chips when others agree,
    [(fingerprint, case, finding)] for every group whose culprit is LIBRARY or UNKNOWN).
    A LIBRARY finding does not fail the chips: their local `wrong` is exonerated and the fleet
    gets a library finding (fleet.judge.verdicts.library_findings).
    """
    groups: dict[tuple[str, str], dict[int, bool]] = defaultdict(dict)
    for r in results:
        if r.probe == "xgemm" and r.error is None:
            groups[(r.fingerprint, r.case)][r.rank] = r.metrics.get("disagree_elements", 0.0) > 0
    judgements: list[Judgement] = []
    library: list[tuple[str, str, Finding]] = []
    for (fp, case), votes in sorted(groups.items()):
        f = culprit(votes)
        if f.culprit is Culprit.CHIP:
            agree = len(votes) - len(f.ranks)
            for rank in f.ranks:
                judgements.append(Judgement(rank=rank, probe="xgemm", case=case, verdict=Verdict.WRONG,
                                            reason=(f"second opinion: the library GEMM and the independent kernel "
                                                    f"disagree on this chip but agree on {agree} of {len(votes)} "
                                                    f"chips with fingerprint {fp}"),
                                            metrics={"agree": float(agree), "voters": float(len(votes))}))
        elif f.culprit in (Culprit.LIBRARY, Culprit.UNKNOWN):
            library.append((fp, case, f))
    return judgements, library
