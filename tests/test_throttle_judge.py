"""The throttle rule (fleet.judge.throttle): a burn that slowed down is `slow` on the driver's word
or on a confirming retest, never on its own timeline (a busy host makes the same shape)."""

from __future__ import annotations

from chipcheck.fleet.judge import speed, throttle
from chipcheck.fleet.judge.verdicts import speed_tables
from chipcheck.results import ProbeResult, Verdict

METRIC, KERNEL = speed_tables()  # the registry's: what a live run judges a burn by
POLICY = speed.SpeedPolicy(min_gap=0.10)


def _burn(rank: int, ratio: float, onset: float | None = 0.4, reasons: tuple[str, ...] = (),
          tf: float = 1.0, best: float = 1.0) -> ProbeResult:
    m = {"tflops": tf, "tflops_best": best, "throughput_ratio": ratio}
    if onset is not None:
        m["throttle_onset_s"] = onset
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp", probe="burn",
                       case="float32", verdict=Verdict.PASS, seed=0, metrics=m,
                       params={"throttle_reasons": list(reasons)})


def _retest(rank: int, turns: list[float]) -> ProbeResult:
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp", probe="retest",
                       case="gemm", verdict=Verdict.PASS, seed=0, params={"turn_s": turns})


def _slow(results: list[ProbeResult]) -> list[tuple[int, str]]:
    js = throttle.judgements(results, POLICY.min_gap) + speed.judge(results, POLICY, METRIC, KERNEL)
    return [(j.rank, j.reason) for j in js if j.verdict is Verdict.SLOW]


def test_a_drop_alone_on_one_device_is_never_slow() -> None:
    # what a clean 0.8 s CPU burn on a busy host gave in CI: 0.80x from t=0.6 s, no NVML
    results = [_burn(0, 0.80, 0.57)]
    assert [c.rank for c in throttle.candidates(results, 0.10)] == [0]
    assert _slow(results) == []
    [note] = speed.judge(results, POLICY, METRIC, KERNEL) or [None]
    assert note is None  # one device: no peer to retest against, so not even a suspect to note


def test_the_drivers_reasons_make_a_drop_slow_at_once() -> None:
    results = [_burn(0, 1.0, None), _burn(1, 0.70, 12.0, ("sw_power_cap", "hw_thermal_slowdown"))]
    [(rank, why)] = _slow(results)
    assert rank == 1 and "sw_power_cap" in why and "0.70x" in why and "t=12.0 s" in why
    assert speed.suspects(results, POLICY, METRIC, KERNEL) == []  # the driver said it: nothing to retest


def test_the_power_cap_alone_is_no_slowdown_a_drop_under_it_is_retested() -> None:
    # An H200's clean 10 s bf16 burn reported sw_power_cap at 9 s (2026-12-04): a healthy chip at its
    # set power limit. A drop under it is a suspect the retest decides, like a drop with no reasons.
    results = [_burn(0, 1.0, None, ("sw_power_cap",)), _burn(1, 0.80, 6.0, ("sw_power_cap",))]
    assert _slow(results) == []
    [s] = speed.suspects(results, POLICY, METRIC, KERNEL)
    assert (s.rank, s.peer) == (1, 0) and "NVML: sw_power_cap, not a slowdown by itself" in s.evidence
    cleared = results + [_retest(1, [1.0, 1.01, 0.99, 1.0, 1.0]), _retest(0, [1.0, 1.0, 1.01, 0.99, 1.0])]
    assert _slow(cleared) == []
    confirmed = results + [_retest(1, [1.3, 1.32, 1.29, 1.31, 1.3]), _retest(0, [1.0, 1.01, 0.99, 1.0, 1.0])]
    [(rank, why)] = _slow(confirmed)
    assert rank == 1 and "confirmed by retest" in why and "sw_power_cap" in why


def test_a_drop_without_reasons_is_a_suspect_the_retest_confirms_or_clears() -> None:
    results = [_burn(0, 1.01, None), _burn(1, 0.75, 3.0), _burn(2, 0.98, None)]
    [s] = speed.suspects(results, POLICY, METRIC, KERNEL)
    assert (s.rank, s.kernel) == (1, "gemm") and s.peer in (0, 2) and "fell to 0.75x" in s.evidence
    assert speed.retest_options([s]) == {"retest_gemm": f"1:{s.peer}"}
    confirmed = results + [_retest(1, [1.3, 1.32, 1.29, 1.31, 1.3]), _retest(s.peer, [1.0, 1.01, 0.99, 1.0, 1.0])]
    [(rank, why)] = _slow(confirmed)
    assert rank == 1 and "confirmed by retest" in why and "fell to 0.75x" in why
    # a busy host slows the peer as much: cleared, with a note saying so
    cleared = results + [_retest(1, [1.3, 1.0, 1.2, 1.1, 1.0]), _retest(s.peer, [1.25, 1.05, 1.2, 1.1, 1.02])]
    assert _slow(cleared) == []
    [j] = speed.judge(cleared, POLICY, METRIC, KERNEL)
    assert j.rank == 1 and "cleared by retest" in j.reason


def test_small_or_unsustained_drops_are_no_candidates() -> None:
    assert throttle.candidates([_burn(0, 0.93), _burn(1, 0.70, None)], 0.10) == []


def test_a_chip_slow_from_early_in_its_burn_is_a_suspect_by_its_sustained_speed() -> None:
    # What a CI run gave (2026-12-01): rank 1 throttled before the first quarter of its burn was over,
    # so its quarters agree (no step down) and its best iteration ran at full speed; only its median
    # (0.46x its peer) shows where it spent the burn. Judged by the best iteration, it passed.
    results = [_burn(0, 1.0, None, tf=0.068, best=0.072), _burn(1, 0.98, None, tf=0.031, best=0.071)]
    assert throttle.candidates(results, POLICY.min_gap) == []
    [s] = speed.suspects(results, POLICY, METRIC, KERNEL)
    assert (s.rank, s.peer, s.kernel) == (1, 0, "gemm") and "burn 0.46x" in s.evidence
    # a clean pair on a busy host, 0.85x by the median, is no suspect (a burn's noise is unknown)
    assert speed.suspects([_burn(0, 1.0, None, tf=0.068), _burn(1, 1.0, None, tf=0.058)], POLICY, METRIC, KERNEL) == []


def test_a_slow_chip_is_retested_when_its_only_peer_is_a_suspect_too() -> None:
    # What a CI run gave (2026-12-02): rank 1 ran its whole burn at half speed (0.49x by the median), and
    # rank 0's burn stepped down when rank 1 started computing beside it on the 2-core host (a throttle
    # candidate). Both suspects, no unsuspected peer left: both were dropped, and the run passed.
    results = [_burn(0, 0.85, 2.0, tf=0.067), _burn(1, 1.0, None, tf=0.033)]
    found = {s.rank: s for s in speed.suspects(results, POLICY, METRIC, KERNEL)}
    assert sorted(found) == [0, 1] and (found[1].peer, found[0].peer) == (0, 1)
    # one interleaved retest of the pair answers for both: rank 1 confirmed, rank 0 cleared
    assert speed.retest_options(list(found.values())) in ({"retest_gemm": "1:0"}, {"retest_gemm": "0:1"})
    confirmed = results + [_retest(1, [2.0, 2.02, 1.98, 2.01, 2.0]), _retest(0, [1.0, 1.01, 0.99, 1.0, 1.0])]
    js = {j.rank: j for j in speed.judge(confirmed, POLICY, METRIC, KERNEL)}
    assert js[1].verdict is Verdict.SLOW and "confirmed by retest" in js[1].reason
    assert js[0].verdict is Verdict.PASS and "cleared by retest" in js[0].reason


def _timeline(reasons_at: dict[float, int], end_s: float = 20.0) -> list[dict[str, float]]:
    return [{"t_s": t, "w_s": 1.0, "tflops": 1.0, "reasons": float(reasons_at.get(t, 0))}
            for t in (float(x) for x in range(int(end_s)))]


def test_only_a_reason_sampled_from_the_drop_on_makes_it_slow_at_once() -> None:
    # NVML can say hw_slowdown for a moment at a clock change: seen at t=0 only, it explains nothing
    # of a drop from t=12 s (a suspect for the retest); seen from t=12 s on, it is the driver's word
    early = _burn(1, 0.70, 12.0, ("hw_slowdown",))
    early.params["timeline"] = _timeline({0.0: 0x8})
    results = [_burn(0, 1.0, None), early]
    assert _slow(results) == []
    [s] = speed.suspects(results, POLICY, METRIC, KERNEL)
    assert s.rank == 1 and "no NVML reasons" in s.evidence
    during = _burn(1, 0.70, 12.0, ("hw_slowdown",))
    during.params["timeline"] = _timeline({0.0: 0x8, 13.0: 0x8 | 0x4, 17.0: 0x8})
    [(rank, why)] = _slow([_burn(0, 1.0, None), during])
    assert rank == 1 and "hw_slowdown" in why
