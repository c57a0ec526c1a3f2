"""Memory pattern probe: injected stuck bits and flips are caught at the right addresses and bits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import cpu_ctx, device, run_json

from chipcheck.probes import base, memory
from chipcheck.probes.base import InvalidConfig
from chipcheck.results import Oracle, Verdict

PROBE = memory.MemoryProbe()


def _cfg(**kw: object) -> memory.MemoryProbe.Config:
    # 4 MiB keeps every case well under a second on a shared 2-core runner.
    return dataclasses.replace(PROBE.config("quick", "cpu", frozenset()), **{"mib": 4, "chunk_mib": 4, **kw})


def _ctx(spec: str | None = None, seed: int = 0) -> base.ProbeContext:
    return cpu_ctx("memory", spec, seed=seed)


def test_clean_run_passes_every_case() -> None:
    cfg = _cfg()
    for case in PROBE.cases(cfg):
        out = PROBE.run_case(_ctx(), cfg, case)
        assert out.verdict is Verdict.PASS, (case, out.mismatches)
        assert out.metrics["bad_reads"] == 0 and out.metrics["gbps"] > 0
        assert out.params["bytes"] == 4 * 2**20 and out.params["backend"] == "torch"


@pytest.mark.parametrize("case", memory.CASES)
def test_stuck_bit_on_read_is_named_by_address_and_bit(case: str) -> None:
    out = PROBE.run_case(_ctx("stuck:bit=3,value=1,index=1000,op=clone"), _cfg(), case)
    assert out.verdict is Verdict.WRONG  # every pass checks a pattern and its complement
    assert out.repeats_bad == out.repeats == 2
    [m] = out.mismatches
    assert m.oracle is Oracle.EXACT and m.tensor == f"memory/{case}"
    assert m.first_indices == [[4000]]  # byte offset of word 1000
    assert set(m.bit_histogram) == {3}
    assert out.metrics["bad_addresses"] == 1 and out.metrics["repeating_addresses"] == 1
    assert "stuck=['0xfa0:b3=1']" in m.note
    assert int(m.actual_bits[0], 2) == int(m.expected_bits[0], 2) | 8


def test_stuck_cell_on_write_hits_every_chunk_at_its_offset() -> None:
    # Four 1 MiB chunks: the fault lands at element 5 of every written chunk, i.e. a stuck bit
    # at byte 20 of each MiB; stuck at 0 shows where the pattern wanted a 1.
    cfg = _cfg(chunk_mib=1)
    out = PROBE.run_case(_ctx("stuck:bit=30,value=0,index=5,op=copy_"), cfg, "address")
    [m] = out.mismatches
    assert m.first_indices == [[20 + k * 2**20] for k in range(4)]
    assert m.tiles == [[0], [1], [2], [3]]  # the MiB regions hit
    assert set(m.bit_histogram) == {30}
    assert out.metrics["repeating_addresses"] == 4
    assert "stuck=['0x14:b30=0', '0x100014:b30=0', '0x200014:b30=0', '0x300014:b30=0']" in m.note


def test_random_flips_do_not_repeat() -> None:
    out = PROBE.run_case(_ctx("bitflip:bit=17,op=clone,seed=4"), _cfg(), "random")
    [m] = out.mismatches
    assert out.verdict is Verdict.WRONG and set(m.bit_histogram) == {17}
    assert out.metrics["bad_reads"] == 4  # one per read-back: 2 passes x (pattern, complement)
    assert out.metrics["repeating_addresses"] == 0  # transients: a new address every time


def test_flip_in_a_later_pass_only_is_flaky() -> None:
    # 2 passes x 2 read-backs (one chunk): after=2 leaves the whole first pass alone.
    out = PROBE.run_case(_ctx("bitflip:bit=9,index=77,op=clone,after=2"), _cfg(), "walking")
    assert out.verdict is Verdict.FLAKY and out.repeats_bad == 1
    assert out.mismatches[0].first_indices == [[77 * 4]]
    assert "passes_bad=[1]" in out.mismatches[0].note


def test_int32_patterns_match_the_reference_definition() -> None:
    for kind in ("walking", "address", "random"):
        for lo, hi, s in ((0, 5000, 0), (123_457, 130_000, 7)):
            idx = torch.arange(lo, hi)
            ref = memory.pattern_torch(kind, idx, s, 0xDEADBEEF).to(torch.int32)
            assert torch.equal(memory.pattern_words(kind, lo, hi, s, 0xDEADBEEF, "cpu"), ref), kind


def test_bad_config_is_rejected() -> None:
    with pytest.raises(InvalidConfig):
        memory.validate(dataclasses.replace(_cfg(), cases=("walking", "galloping")))
    with pytest.raises(InvalidConfig):
        memory.validate(dataclasses.replace(_cfg(), mib=0, fraction=0.0))


def test_cli_stuck_bit_on_one_rank(tmp_path) -> None:
    code, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "memory", "--min-gap", "0.9", "--inject",
                               "stuck:rank=1,bit=3,value=1,index=1000,op=clone,probe=memory")
    assert code == 1, out
    assert device(data, 0)["verdict"] == "pass"
    bad = device(data, 1)
    assert bad["verdict"] == "wrong"
    [probe] = bad["probes"]
    for case in probe["details"]["cases"]:
        [m] = case["mismatches"]
        assert m["first_indices"] == [[4000]] and set(m["bit_histogram"]) == {"3"}, case["case"]
    assert any("first at [4000]" in why for why in probe["details"]["reasons"])
