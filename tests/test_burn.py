"""Burn probe: every iteration checked; late errors and throttling are named with their time."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from conftest import cpu_ctx

from chipcheck.fleet.judge import throttle
from chipcheck.probes import base, burn, faults
from chipcheck.results import Oracle, ProbeResult, Verdict

PROBE = burn.BurnProbe()


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """As in a worker: one compute thread, timed in its own CPU seconds (immune to a busy host)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw: object) -> burn.BurnProbe.Config:
    return dataclasses.replace(PROBE.config("quick", "cpu", frozenset()), **{"duration_s": 0.8, **kw})


def _ctx(spec: str | None = None, deadline: float | None = None) -> base.ProbeContext:
    return cpu_ctx("burn", spec, deadline=deadline)


def test_clean_burn_passes_and_keeps_a_timeline() -> None:
    out = PROBE.run_case(_ctx(), _cfg(), "float32")
    assert out.verdict is Verdict.PASS and out.repeats >= 4 and out.repeats_bad == 0
    assert out.metrics["tflops_best"] >= out.metrics["tflops"] > 0
    assert "first_bad_iteration" not in out.metrics
    tl = out.params["timeline"]
    assert sum(w["iterations"] for w in tl) == out.repeats and all(w["bad"] == 0 for w in tl)


def test_error_after_warm_up_is_named_with_iteration_and_time() -> None:
    # Two GEMMs per iteration (exact, then random): the 41st mm call is iteration 20's exact GEMM.
    out = PROBE.run_case(_ctx("bitflip:bit=20,after=40"), _cfg(min_iterations=30), "float32")
    assert out.verdict is Verdict.FLAKY  # clean for 20 iterations, bad ever after
    assert out.metrics["first_bad_iteration"] == 20
    assert 0 < out.metrics["first_bad_s"] < out.metrics["elapsed_s"]
    assert out.repeats_bad == out.repeats - 20
    by = {m.oracle: m for m in out.mismatches}
    assert set(by) == {Oracle.EXACT, Oracle.FREIVALDS}
    assert "first_bad_iteration=20" in by[Oracle.EXACT].note
    assert set(by[Oracle.EXACT].bit_histogram) == {20}


@pytest.mark.timing
def test_throttling_is_detected_with_its_onset() -> None:
    # From mm call 100 on (iteration 50) every GEMM takes 4x as long: a chip that throttles.
    # Sized in iterations, not seconds, so a loaded CI host changes the windows, not the story.
    cfg = _cfg(duration_s=0.05, min_iterations=150, window_s=0.01, sizes={"float32": 128})
    out = PROBE.run_case(_ctx("slow:factor=4,after=100"), cfg, "float32")
    assert out.verdict is Verdict.PASS  # slow is not wrong
    m = out.metrics
    assert m["throughput_ratio"] < 0.7
    assert abs(m["throttle_onset_iteration"] - 50) <= 8  # a loaded 2-core host blurs the edge a little
    assert 0 < m["throttle_onset_s"] < m["elapsed_s"]
    r = ProbeResult(run_id="r", host="h", rank=3, device="cpu:3", fingerprint="f", probe="burn", case="float32",
                    verdict=out.verdict, seed=0, params=out.params, metrics=out.metrics)
    [c] = throttle.candidates([r], 0.10)
    assert c.rank == 3 and c.onset_s == m["throttle_onset_s"] and c.reasons == ()
    assert throttle.judgements([r], 0.10) == []  # no NVML reason: the retest must confirm it (test_throttle_judge)


def test_deadline_bounds_the_run() -> None:
    t0 = time.monotonic()
    out = PROBE.run_case(_ctx(deadline=time.monotonic() + 0.3), _cfg(duration_s=60.0), "float32")
    assert time.monotonic() - t0 < 5.0 and out.repeats >= 4
    past = PROBE.run_case(_ctx(deadline=time.monotonic() - 1.0), _cfg(), "float32")
    assert past.repeats == 4  # min_iterations, even when the budget is already spent


def test_throttle_onset_pure() -> None:
    assert burn.throttle_onset([(0, 10.0), (1, 10.0), (2, 6.0), (3, 5.0)], 0.1) == (0.5, 2)
    assert burn.throttle_onset([(0, 10.0), (1, 6.0), (2, 10.0), (3, 9.5)], 0.1) == (0.95, None)  # recovered
    assert burn.throttle_onset([(0, 10.0)], 0.1) == (1.0, None)
    assert burn.reason_names(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]


def test_timeline_rebins_long_runs() -> None:
    its = [burn._Iter(t=i * 0.5, gemm_s=0.1, bad=False) for i in range(2000)]
    tl = burn.timeline(its, [], 1e12, window_s=0.25)
    assert len(tl) <= burn.MAX_WINDOWS and sum(w["iterations"] for w in tl) == 2000


def test_not_in_a_default_run_except_burnin() -> None:
    assert burn.BurnProbe.default is False and "burnin" in burn.BurnProbe.default_profiles
    assert burn.NvmlSampler(torch.device("cpu")).ok is False


def test_a_wrong_warm_up_call_is_caught() -> None:
    # a process-wide fault on one GEMM only: the warm-up (after the Freivalds plan's three 1-row
    # products), which is not timed but is checked
    stop = faults.start_process_faults(faults.parse("bitflip:bit=20,op=mm,after=3,count=1,scope=process"), 0)
    try:
        out = PROBE.run_case(_ctx(), _cfg(duration_s=0.2), "float32")
    finally:
        stop()
    assert out.verdict is Verdict.FLAKY and out.repeats_bad == 1
    assert out.mismatches[0].oracle is Oracle.EXACT and "warm-up" in out.mismatches[0].note
    clean = PROBE.run_case(_ctx(), _cfg(duration_s=0.2), "float32")
    assert clean.verdict is Verdict.PASS and not clean.mismatches
