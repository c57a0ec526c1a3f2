"""Consensus among peers of one fingerprint (fleet.judge.consensus), and the peer comparison
(fleet.judge.peers) every speed rule starts from."""

from __future__ import annotations

import random

from chipcheck.fleet.judge.consensus import consensus
from chipcheck.fleet.judge.peers import peer_ratios
from chipcheck.results import ProbeResult, Verdict


def _r(rank: int, h: str = "aaa", tf: float = 1.0, fp: str = "fp1", case: str = "bfloat16/random",
       verdict: Verdict = Verdict.PASS) -> ProbeResult:
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint=fp, probe="matmul",
                       case=case, verdict=verdict, seed=0, output_hash=h, metrics={"tflops_best": tf})


def test_minority_hash_is_wrong_and_named() -> None:
    js, groups = consensus([_r(0), _r(1), _r(2, "bbb"), _r(3)])
    assert [(j.rank, j.verdict) for j in js] == [(2, Verdict.WRONG)]
    assert "3 of 4 devices" in js[0].reason
    assert groups[0].dissenters == (2,) and not groups[0].no_majority


def test_no_majority_is_reported_never_passed() -> None:
    from chipcheck.fleet.judge import blame

    results = [_r(0, "a"), _r(1, "b")]
    js, groups = consensus(results)
    assert js == [] and groups[0].no_majority  # nobody is wrong on a vote without a majority ...
    resolved = blame.resolve(results, js, groups)  # ... the judge calls the pair suspect instead
    assert {(j.rank, j.verdict) for j in resolved} == {(0, Verdict.SUSPECT), (1, Verdict.SUSPECT)}
    assert all("no majority" in j.reason for j in resolved)


def test_devices_caught_locally_do_not_vote() -> None:
    # a device its own oracles caught does not vote; the others' agreement stands against it, and the
    # reason says the vote was among those that passed (not "1 of 1 devices agree", read as unanimity)
    js, _ = consensus([_r(0, "a"), _r(1, "b", verdict=Verdict.WRONG), _r(2, "a")])
    assert [j.rank for j in js] == [1]
    assert "differ from the 2 device(s) with fingerprint fp1 that passed their own checks" in js[0].reason
    assert "1 of 3 failed them, this one included" in js[0].reason
    [j] = consensus([_r(0, "a"), _r(1, "b", verdict=Verdict.WRONG)])[0]
    assert j.rank == 1 and "the 1 device(s)" in j.reason and " of 1 devices" not in j.reason


def test_different_fingerprints_are_never_compared() -> None:
    js, groups = consensus([_r(0, "a", fp="A100"), _r(1, "b", fp="H100"), _r(2, "b", fp="H100")])
    assert js == [] and len(groups) == 1


def test_peer_ratios_equal_comparing_each_device_with_all_the_others() -> None:
    import numpy as np

    rng = random.Random(3)
    for n in (2, 3, 5, 8, 17):
        v = np.array([rng.choice((1.0, 0.9, rng.gauss(1.0, 0.05))) for _ in range(n)])
        ratio, flag = peer_ratios(v, 3.5)
        for i in range(n):
            others = np.delete(v, i)
            med = float(np.median(others))
            assert abs(ratio[i] - v[i] / med) < 1e-12
            if n - 1 >= 4:
                mad = float(np.median(np.abs(others - med)))
                z = (med - v[i]) / (1.4826 * mad) if mad > 0 else (np.inf if v[i] < med else 0.0)
                assert bool(flag[i]) == (z >= 3.5)


def _flaky(rank: int, *hashes: str) -> ProbeResult:
    """A device whose repeats disagree with no oracle to say which is right (a user's step)."""
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp1", probe="matmul",
                       case="bfloat16/random", verdict=Verdict.FLAKY, seed=0, repeats=len(hashes), repeat_hashes=hashes)


def test_a_device_whose_every_repeat_differs_from_its_peers_is_wrong_not_flaky() -> None:
    # a process-wide fault in every 5th kernel: each repeat is hit somewhere else, so the device's repeats
    # disagree (flaky on its own) and none of them computed what its three peers agree on
    peers = [_r(r, "good") for r in (0, 2, 3)]
    js, groups = consensus([*peers, _flaky(1, "bad1", "bad2")])
    assert [(j.rank, j.verdict) for j in js] == [(1, Verdict.WRONG)]
    assert "each of its 2 repeats computed other bits than the 3 agreeing devices" in js[0].reason
    assert groups[0].dissenters == (1,)
    # one repeat computed the peers' bits: wrong in some repeats, which is what flaky means
    assert consensus([*peers, _flaky(1, "good", "bad2")])[0] == []
    # a lone peer is not enough to call it wrong
    assert consensus([_r(0, "good"), _flaky(1, "bad1", "bad2")])[0] == []


def test_repeat_hashes_survive_the_store_format() -> None:
    r = _flaky(1, "a", "b")
    assert ProbeResult.from_dict(r.to_dict()) == r
    assert "repeat_hashes" not in _r(0).to_dict()  # results without them are written as before
