"""Consensus: do devices of one fingerprint compute the same bits?

Pure functions over typed results; no I/O. Every device with the same fingerprint computing the
same case from the same inputs must produce the same bits. The majority hash (over more than half
of the voters, after removing devices their own oracles already caught) is right; a minority is
`wrong`. A group with no majority is reported as such (`no_majority`) and its members are left to
the blame rule (fleet.judge.blame), which pins the fault on a member with evidence of its own or
calls the group `suspect`: never silently passed, never `wrong` for everyone. In a collective probe
(`collective`) ranks exchange data, so a minority of several ranks holds one value alike (e.g. a
tensor-parallel pair): it is a suspicion for the blame rule too, not several independent witnesses.
A device whose repeats disagree among themselves with no oracle to say which is right (`flaky`) votes
with none of them, but is held to the majority: when every one of its repeats differs from what at
least two agreeing peers computed, it computed wrong bits every time (`wrong`, not merely flaky); when
one repeat matches, it stays flaky (wrong in some repeats).
"""

from __future__ import annotations

from collections import defaultdict

from ...results import ConsensusGroup, Judgement, ProbeResult, Verdict


def consensus(results: list[ProbeResult], collective: frozenset[str] = frozenset()
              ) -> tuple[list[Judgement], list[ConsensusGroup]]:
    groups: dict[tuple[str, str, str], list[ProbeResult]] = defaultdict(list)
    for r in results:
        if (r.output_hash or r.repeat_hashes) and r.error is None:
            groups[(r.fingerprint, r.probe, r.case)].append(r)
    judgements: list[Judgement] = []
    summary: list[ConsensusGroup] = []
    for (fp, probe, case), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        voters = [m for m in members if m.verdict is Verdict.PASS]
        if not voters:  # every member is already caught by its own oracles: nothing left to vote on
            continue
        counts: dict[str, int] = defaultdict(int)
        for m in voters:
            counts[m.output_hash] += 1
        top, n_top = max(counts.items(), key=lambda kv: kv[1], default=("", 0))
        # One distinct output among the voters is agreement, even with a single voter left.
        has_majority = n_top * 2 > len(voters) or len(counts) <= 1
        if has_majority:
            dissent = [m for m in members if _dissents(m, top, n_top)]
        else:
            dissent = list(voters)
        shared = not has_majority or (probe in collective and len(dissent) > 1)
        caught = len(members) - len(voters)
        for m in ([] if shared else dissent):
            if not m.output_hash:
                reason = (f"consensus: each of its {len(m.repeat_hashes)} repeats computed other bits than the "
                          f"{n_top} agreeing devices with fingerprint {fp} (its repeats also differ among "
                          f"themselves): wrong every time, not merely nondeterministic")
            elif m.verdict is Verdict.PASS:
                reason = (f"consensus: output bits differ from the majority ({n_top} of {len(voters)} devices "
                          f"with fingerprint {fp} agree; hash {m.output_hash[:12]} vs {top[:12]})")
            else:  # its own checks caught it already: the vote is among the others, say so
                reason = (f"consensus: output bits differ from the {n_top} device(s) with fingerprint {fp} "
                          f"that passed their own checks ({caught} of {len(members)} failed them, this one "
                          f"included; hash {m.output_hash[:12]} vs {top[:12]})")
            judgements.append(Judgement(rank=m.rank, probe=probe, case=case, verdict=Verdict.WRONG, reason=reason,
                                        metrics={"agree": float(n_top), "voters": float(len(voters))}))
        summary.append(ConsensusGroup(fingerprint=fp, probe=probe, case=case, devices=len(members), majority_hash=top,
                                      agree=n_top, no_majority=shared,
                                      dissenters=tuple(sorted(m.rank for m in dissent))))
    return judgements, summary


def _dissents(m: ProbeResult, top: str, n_top: int) -> bool:
    """Does `m` differ from the majority's output `top`? A device whose repeats differed among
    themselves (no hash of its own, each repeat's kept) dissents when none of its repeats computed
    `top` and at least two devices agree on it (one peer is not enough to call every repeat wrong)."""
    if m.output_hash:
        return m.output_hash != top
    return n_top >= 2 and top not in m.repeat_hashes
