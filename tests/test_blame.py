"""The blame rule (fleet.judge.blame): only evidence against a device's own computation blames it."""

from __future__ import annotations

import dataclasses

from chipcheck.fleet import summary
from chipcheck.fleet.judge import blame
from chipcheck.fleet.judge.consensus import consensus
from chipcheck.results import (
    Blame,
    DeviceInfo,
    DeviceKind,
    ErrorInfo,
    ErrorKind,
    Mismatch,
    Oracle,
    ProbeResult,
    Verdict,
)


def _res(rank: int, probe: str, case: str, verdict: Verdict = Verdict.PASS, *, mismatches: list[Mismatch] | None = None,
         h: str = "") -> ProbeResult:
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp", probe=probe,
                       case=case, verdict=verdict, seed=0, mismatches=mismatches or [], output_hash=h,
                       repeats=1, repeats_bad=int(verdict is not Verdict.PASS))


def _shared(group: list[int]) -> Mismatch:
    return Mismatch(oracle=Oracle.REFERENCE, tensor="loss", bad_elements=1, total_elements=8, blame=Blame.SHARED,
                    group=group, note="global loss (all ranks see it)")


def _own() -> Mismatch:
    return Mismatch(oracle=Oracle.EXACT, tensor="C", bad_elements=1, total_elements=64, first_indices=[[0, 1]],
                    bit_histogram={20: 1})


def _devs(n: int) -> dict[int, DeviceInfo]:
    return {r: DeviceInfo(index=r, kind=DeviceKind.CPU, name="cpu", memory_bytes=0, uuid=f"u{r}", host="h",
                          fingerprint="fp") for r in range(n)}


def _verdicts(results: list[ProbeResult], n: int = 4) -> dict[int, Verdict]:
    cons, groups = consensus(results, frozenset({"model_dp"}))
    js = cons + blame.resolve(results, cons, groups)
    s = summary.summarize("r", _devs(n), results, js, groups, profile="quick", seed=0, started=0, ended=1)
    return {d.rank: d.verdict for d in s.devices}


def test_shared_evidence_is_pinned_on_the_member_with_its_own() -> None:
    every = [0, 1, 2, 3]
    results = [_res(r, "model_dp", "tp2/fp32", Verdict.WRONG, mismatches=[_shared(every)]) for r in every]
    results += [_res(r, "matmul", "float32/exact", Verdict.WRONG if r == 3 else Verdict.PASS,
                     mismatches=[_own()] if r == 3 else []) for r in every]
    v = _verdicts(results)
    assert v == {0: Verdict.PASS, 1: Verdict.PASS, 2: Verdict.PASS, 3: Verdict.WRONG}


def test_shared_evidence_without_a_culprit_is_suspect_for_the_group_only() -> None:
    results = [_res(r, "model_dp", "tp2/fp32", Verdict.WRONG if r in (0, 1) else Verdict.PASS,
                    mismatches=[_shared([0, 1])] if r in (0, 1) else []) for r in range(4)]
    v = _verdicts(results)
    assert v == {0: Verdict.SUSPECT, 1: Verdict.SUSPECT, 2: Verdict.PASS, 3: Verdict.PASS}
    s = summary.summarize("r", _devs(4), results, blame.resolve(results, [], []), [], profile="quick", seed=0,
                          started=0, ended=1)
    assert len(s.failed) == 0 and len(s.suspect) == 2 and s.verdict is Verdict.SUSPECT


def test_a_minority_pair_of_a_collective_probe_is_a_suspicion_not_two_witnesses() -> None:
    # 8 ranks in tensor-parallel pairs: pair (0, 1) ends with other bits than the three other pairs
    results = [_res(r, "model_dp", "tp2/fp32", h="bad" if r in (0, 1) else "good") for r in range(8)]
    results += [_res(r, "matmul", "float32/exact", Verdict.WRONG if r == 1 else Verdict.PASS,
                     mismatches=[_own()] if r == 1 else []) for r in range(8)]
    v = _verdicts(results, 8)
    assert [r for r, x in v.items() if x is not Verdict.PASS] == [1] and v[1] is Verdict.WRONG


def test_a_minority_of_independent_devices_is_wrong() -> None:
    results = [_res(r, "matmul", "float32/random", h="bad" if r in (0, 1) else "good") for r in range(8)]
    v = _verdicts(results, 8)
    assert {r for r, x in v.items() if x is Verdict.WRONG} == {0, 1}


def test_own_evidence_is_held_and_explained_once() -> None:
    m = Mismatch(oracle=Oracle.REPLICA, tensor="replicated", bad_elements=1, total_elements=1,
                 note="data-parallel replica check: differs from the majority (3 of 4 ranks)")
    steps = [dataclasses.replace(m, note=m.note + f" step={i}") for i in range(4)]
    r = _res(2, "model_dp", "dp/fp32", Verdict.WRONG, mismatches=steps)
    assert r.held is Verdict.WRONG
    line = summary.explain(r)
    assert line.count("replica check") == 1 and "(x4)" in line and "first at ?" not in line


def test_a_reference_deviation_every_chip_shares_bit_for_bit_blames_no_chip() -> None:
    ref = Mismatch(oracle=Oracle.REFERENCE, tensor="dq", bad_elements=48, total_elements=32768)
    results = [_res(r, "attention", "bfloat16/d128/causal", Verdict.WRONG, mismatches=[ref], h="same")
               for r in range(4)]
    found = blame.systematic(results)
    assert found.exonerate == {(r, "attention", "bfloat16/d128/causal") for r in range(4)}
    assert "systematic" in found.findings[0] and "all 4 devices" in found.findings[0]
    # one chip computing other bits, or an exact oracle firing everywhere, is not systematic
    odd = results[:3] + [_res(3, "attention", "bfloat16/d128/causal", Verdict.WRONG, mismatches=[ref], h="other")]
    assert blame.systematic(odd).exonerate == set()
    exact = [_res(r, "matmul", "float32/exact", Verdict.WRONG, mismatches=[_own()], h="same") for r in range(4)]
    assert blame.systematic(exact).exonerate == set()


def test_a_flaky_case_whose_repeats_only_disagree_says_so_not_flaky_in_0_of_n() -> None:
    rep = Mismatch(oracle=Oracle.REPEAT, tensor="loss", bad_elements=1, total_elements=4)
    r = dataclasses.replace(_res(1, "model_step", "fp32", Verdict.FLAKY, mismatches=[rep]), repeats=2, repeats_bad=0)
    line = summary.explain(r)
    assert "repeats differ bit for bit" in line and "0 of 2" not in line, line
    bad = dataclasses.replace(r, verdict=Verdict.WRONG, repeats_bad=2)
    assert "wrong in 2 of 2 repeats" in summary.explain(bad)


def test_a_scrambled_word_s_flipped_bits_read_as_runs() -> None:
    m = Mismatch(oracle=Oracle.EXACT, tensor="out", bad_elements=3, total_elements=64, first_indices=[[0, 5]],
                 bit_histogram={b: 1 for b in [*range(27), 31]})
    line = summary.explain(_res(2, "matmul", "float32/exact", Verdict.WRONG, mismatches=[m]))
    assert "flipped bits [0-26,31]" in line, line
    one = dataclasses.replace(m, bit_histogram={20: 3, 22: 1})
    assert "flipped bits [20,22]" in summary.explain(_res(2, "matmul", "float32/exact", Verdict.WRONG, mismatches=[one]))


def test_an_error_several_cases_share_is_said_once_naming_them() -> None:
    lost = ErrorInfo(kind=ErrorKind.PEER_LOST, message="not run: peer rank 2 lost (cpu:2 on h: hung in matmul)")
    rs = [dataclasses.replace(_res(0, "collectives", f"c{i}", Verdict.ERROR), error=lost) for i in range(5)]
    own = ErrorInfo(kind=ErrorKind.TIMEOUT, message="c5 exceeded its 20s watchdog")
    rs.insert(1, dataclasses.replace(_res(0, "collectives", "c5", Verdict.ERROR), error=own))
    rs.append(_res(0, "collectives", "c6", Verdict.WRONG, mismatches=[_own()]))
    s = summary.summarize("r", {0: DeviceInfo(index=0, kind=DeviceKind.CPU, name="cpu", memory_bytes=0, uuid="u", host="h", fingerprint="fp")}, rs, [], [],
                          profile="quick", seed=0, started=0.0, ended=1.0, speed_metrics={})
    reasons = s.devices[0].probes[0].reasons
    assert len(reasons) == 3, reasons  # the shared error once, at its first case's place
    assert reasons[0] == ("h cpu:0 collectives c0, c1, c2 and 2 more (5 cases): error (peer_lost): "
                          "not run: peer rank 2 lost (cpu:2 on h: hung in matmul)")
    assert "c5: error (timeout)" in reasons[1] and "c6: wrong" in reasons[2]
