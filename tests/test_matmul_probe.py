"""The matmul probe in-process: every oracle passes a clean device and catches its fault."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_ctx

from chipcheck.probes import base
from chipcheck.probes.backends.torch import TorchBackend
from chipcheck.probes.matmul import MatmulProbe, hadamard
from chipcheck.results import Oracle, Verdict

SIZES = {"float32": 128, "bfloat16": 128, "float16": 64}


def _ctx(inject: str | None = None, seed: int = 7) -> base.ProbeContext:
    return cpu_ctx("matmul", inject, seed=seed)


def _cfg(**kw: object) -> MatmulProbe.Config:
    return MatmulProbe.Config(sizes=dict(SIZES), repeats=3, max_repeats=3, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [2, 16, 256])
def test_hadamard_expected_is_the_true_product(n: int) -> None:
    a, b, e = hadamard(TorchBackend("cpu"), n, 123)
    assert torch.equal((a.double() @ b.double()).float(), e)
    assert set(a.unique().tolist()) <= {-2.0, -1.0, 1.0, 2.0} and set(b.unique().tolist()) == {-1.0, 1.0}
    assert int((e != 0).sum()) == n  # a scaled signed permutation


def test_clean_device_passes_every_case() -> None:
    p, cfg, ctx = MatmulProbe(), _cfg(), _ctx()
    for case in p.cases(cfg):
        out = p.run_case(ctx, cfg, case)
        assert out.verdict is Verdict.PASS, (case, out.mismatches)
        assert out.metrics["tflops"] > 0 and out.repeats == 3
        if case.endswith("random"):
            assert len(out.output_hash) == 32


def test_outputs_are_identical_across_runs_for_consensus() -> None:
    p, cfg = MatmulProbe(), _cfg()
    h1 = p.run_case(_ctx(), cfg, "bfloat16/random").output_hash
    assert h1 == p.run_case(_ctx(), cfg, "bfloat16/random").output_hash
    assert h1 != p.run_case(_ctx(seed=8), cfg, "bfloat16/random").output_hash


# Mantissa low/high, exponent and sign positions of each dtype.
FP32_BITS = [0, 5, 12, 22, 23, 27, 30, 31]
BF16_BITS = [0, 3, 6, 7, 10, 14, 15]


@pytest.mark.parametrize("dtype, bit", [("float32", b) for b in FP32_BITS] + [("bfloat16", b) for b in BF16_BITS])
def test_exact_oracle_catches_every_bit_position(dtype: str, bit: int) -> None:
    p, cfg = MatmulProbe(), _cfg()
    out = p.run_case(_ctx(f"bitflip:rank=0,bit={bit}"), cfg, f"{dtype}/exact")
    assert out.verdict is Verdict.WRONG
    (m,) = out.mismatches
    assert m.oracle is Oracle.EXACT and m.tensor == "C"
    assert list(m.bit_histogram) == [bit]
    assert m.bad_elements == 1 and out.repeats_bad == 3
    assert len(m.expected_bits[0]) == (32 if dtype == "float32" else 16)


@pytest.mark.parametrize("bit", [25, 28, 30])
def test_freivalds_locates_a_high_order_flip_without_a_reference(bit: int) -> None:
    p, cfg = MatmulProbe(), _cfg()
    out = p.run_case(_ctx(f"bitflip:rank=0,bit={bit}"), cfg, "float32/random")
    fr = next(m for m in out.mismatches if m.oracle is Oracle.FREIVALDS)
    rep = next(m for m in out.mismatches if m.oracle is Oracle.REPEAT)
    # Freivalds names the very element that repeat-determinism saw change
    assert fr.first_indices and fr.first_indices[0] in rep.first_indices
    assert "bad_rows=1 bad_cols=1" in fr.note
    assert out.verdict is Verdict.WRONG and out.repeats_bad == 3


def test_low_order_flip_in_random_mode_shows_as_nondeterminism() -> None:
    # A one-ulp flip is inside every tolerance: repeat-determinism (and the fleet hash) catch it.
    out = MatmulProbe().run_case(_ctx("bitflip:rank=0,bit=0"), _cfg(), "float32/random")
    assert out.nondeterministic and any(m.oracle is Oracle.REPEAT for m in out.mismatches)
    assert out.verdict in (Verdict.FLAKY, Verdict.WRONG)


def test_nan_is_caught_as_nonfinite() -> None:
    out = MatmulProbe().run_case(_ctx("nan:rank=0"), _cfg(), "bfloat16/random")
    assert out.verdict is Verdict.WRONG
    assert any(m.oracle is Oracle.NONFINITE for m in out.mismatches)


def test_stuck_bit_is_caught_with_its_bit() -> None:
    out = MatmulProbe().run_case(_ctx("stuck:rank=0,bit=30,value=1,rate=0.01"), _cfg(), "float32/exact")
    assert out.verdict is Verdict.WRONG and 30 in out.mismatches[0].bit_histogram


def test_intermittent_fault_is_flaky_with_its_repeat_rate() -> None:
    # after=2: the first two calls are clean (the first, warm one is checked but never timed)
    cfg = MatmulProbe.Config(sizes={"float32": 64}, repeats=4, max_repeats=4)
    out = MatmulProbe().run_case(_ctx("bitflip:rank=0,bit=27,after=2"), cfg, "float32/exact")
    assert out.verdict is Verdict.FLAKY and (out.repeats_bad, out.repeats) == (2, 4)


def test_sizes_must_be_powers_of_two() -> None:
    from chipcheck.probes.matmul import validate

    with pytest.raises(base.InvalidConfig, match="power of two"):
        validate(MatmulProbe.Config(sizes={"float32": 100}))


def test_profiles_exist_for_every_kind() -> None:
    p = MatmulProbe()
    for kind in ("cpu", "cuda"):
        for prof in ("quick", "standard", "nightly", "burnin"):
            assert p.cases(p.config(prof, kind, frozenset({"tf32", "fp8"})))
    assert "tf32/exact" not in p.cases(p.config("quick", "cuda", frozenset()))
