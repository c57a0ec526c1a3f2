"""Bandwidth probe: measures GB/s (bytes read + written), checks the copied bits, slows under a fault."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import cpu_ctx

from chipcheck.probes import bandwidth, base
from chipcheck.results import Oracle, Verdict

PROBE = bandwidth.BandwidthProbe()


def _cfg() -> bandwidth.BandwidthProbe.Config:
    return dataclasses.replace(PROBE.config("quick", "cpu", frozenset()), mib=16, repeats=4)


def _ctx(spec: str | None = None) -> base.ProbeContext:
    return cpu_ctx("bandwidth", spec)


@pytest.mark.parametrize("case", bandwidth.CASES)
def test_clean_run_measures_and_passes(case: str) -> None:
    out = PROBE.run_case(_ctx(), _cfg(), case)
    assert out.verdict is Verdict.PASS
    assert out.metrics["gbps_best"] >= out.metrics["gbps"] > 0
    per_call = (2 if case == "copy" else 1) * 16 * 2**20
    assert out.params["bytes_per_call"] == per_call
    assert out.metrics["gbps_best"] == pytest.approx(per_call / out.metrics["time_ms_min"] / 1e6)
    assert "spec_gbps" not in out.metrics  # no spec sheet for a CPU worker


def test_corrupted_copy_is_caught_at_its_element() -> None:
    out = PROBE.run_case(_ctx("bitflip:bit=22,index=4242,op=copy_"), _cfg(), "copy")
    assert out.verdict is Verdict.WRONG and out.repeats_bad == out.repeats
    [m] = out.mismatches
    assert m.oracle is Oracle.EXACT and m.first_indices == [[4242]] and set(m.bit_histogram) == {22}


@pytest.mark.timing
def test_slow_copy_shows_in_gbps_best() -> None:
    clean = PROBE.run_case(_ctx(), _cfg(), "copy").metrics["gbps_best"]
    slow = PROBE.run_case(_ctx("slow:factor=3,op=copy_"), _cfg(), "copy").metrics["gbps_best"]
    assert slow < 0.7 * clean


def test_speed_metric_and_spec_table() -> None:
    assert bandwidth.BandwidthProbe.speed_metric == "gbps_best"
    assert bandwidth.spec_gbps(torch.device("cpu")) is None
    with pytest.raises(base.InvalidConfig):
        PROBE.config("nonesuch", "cpu", frozenset())
