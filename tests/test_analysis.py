"""Fleet judgement: consensus among peers, and slowness that is real but never noise."""

from __future__ import annotations

import random

from chipcheck.fleet import analysis
from chipcheck.results import ProbeResult, Verdict


def _r(rank: int, h: str = "aaa", tf: float = 1.0, fp: str = "fp1", case: str = "bfloat16/random",
       verdict: Verdict = Verdict.PASS) -> ProbeResult:
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint=fp, probe="matmul",
                       case=case, verdict=verdict, seed=0, output_hash=h, metrics={"tflops_best": tf})


def test_minority_hash_is_wrong_and_named() -> None:
    js, groups = analysis.consensus([_r(0), _r(1), _r(2, "bbb"), _r(3)])
    assert [(j.rank, j.verdict) for j in js] == [(2, Verdict.WRONG)]
    assert "3 of 4 devices" in js[0].reason
    assert groups[0].dissenters == (2,) and not groups[0].no_majority


def test_no_majority_is_reported_never_passed() -> None:
    from chipcheck.fleet.judge import blame

    results = [_r(0, "a"), _r(1, "b")]
    js, groups = analysis.consensus(results)
    assert js == [] and groups[0].no_majority  # nobody is wrong on a vote without a majority ...
    resolved = blame.resolve(results, js, groups)  # ... the judge calls the pair suspect instead
    assert {(j.rank, j.verdict) for j in resolved} == {(0, Verdict.SUSPECT), (1, Verdict.SUSPECT)}
    assert all("no majority" in j.reason for j in resolved)


def test_devices_caught_locally_do_not_vote() -> None:
    # two devices: one already wrong by its own oracles; the other is the majority of one voter? no:
    # a single voter is not a majority, so the group is reported - but the known-bad one stays wrong
    js, _ = analysis.consensus([_r(0, "a"), _r(1, "b", verdict=Verdict.WRONG), _r(2, "a")])
    assert [j.rank for j in js] == [1]


def test_different_fingerprints_are_never_compared() -> None:
    js, groups = analysis.consensus([_r(0, "a", fp="A100"), _r(1, "b", fp="H100"), _r(2, "b", fp="H100")])
    assert js == [] and len(groups) == 1


def test_slow_device_is_flagged_with_its_ratio() -> None:
    rs = [_r(i, tf=1.0) for i in range(7)] + [_r(7, tf=1 / 1.3)]
    (j,) = analysis.slow(rs)
    assert j.rank == 7 and j.verdict is Verdict.SLOW
    assert abs(j.metrics["ratio_to_peers"] - 1 / 1.3) < 1e-9


def test_slow_with_two_devices_uses_the_peer() -> None:
    (j,) = analysis.slow([_r(0, tf=1.0), _r(1, tf=0.75)])
    assert j.rank == 1


def test_noise_is_not_slow() -> None:
    rng = random.Random(0)
    for _ in range(200):
        rs = [_r(i, tf=rng.gauss(1.0, 0.02), case=c) for i in range(16) for c in ("a", "b", "c")]
        assert analysis.slow(rs) == []


def test_a_five_percent_gap_is_under_the_default_minimum() -> None:
    rs = [_r(i, tf=1.0) for i in range(8)] + [_r(8, tf=0.95)]
    assert analysis.slow(rs) == []
    assert [j.rank for j in analysis.slow(rs, analysis.SlowPolicy(min_gap=0.04))] == [8]
