"""Attention through JAX: the torch probe's one definition (cases, inputs, float64 reference and tolerance,
flow) with JAX's kernels (the formula and jax.nn.dot_product_attention, forward and backward), and faults caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from conftest import probe_of  # noqa: E402
from jax_cli import run_jax  # noqa: E402

from chipcheck.probes import attention as ta  # noqa: E402
from chipcheck.probes import base, faults  # noqa: E402
from chipcheck.probes import jax_attention as ja  # noqa: E402
from chipcheck.probes import jax_backend as jb  # noqa: E402
from chipcheck.probes.backends.jax import JaxBackend  # noqa: E402
from chipcheck.probes.base import CaseOutcome, InvalidConfig  # noqa: E402
from chipcheck.results import Oracle, Verdict  # noqa: E402

CFG = ta.AttentionProbe.Config(head_dims={"float32": (32,), "bfloat16": (32,), "float16": (32,)},
                               seq={"float32": 32, "bfloat16": 32, "float16": 32}, batch=2, q_heads=4, kv_heads=2)
KERNELS = ["formula", "jax_nn"]


def _run(case: str, spec: str | None = None) -> CaseOutcome:
    jb.init()
    inj = jb.Injector.for_rank(faults.parse(spec) if spec else [], 0, "attention")
    return ja.run_case(jax.devices()[0], CFG, case, 0, inj)


def _by(out: CaseOutcome, oracle: Oracle, kernel: str) -> list:
    return [m for m in out.mismatches if m.oracle is oracle and f"backend={kernel}" in m.note]


def test_the_cases_are_the_torch_probes_without_float16() -> None:
    assert ja.cases(CFG) == [c for c in ta.AttentionProbe().cases(CFG) if not c.startswith("float16")]
    assert ja.cases(CFG)[:2] == ["float32/d32/exact", "float32/d32/full"]


@pytest.mark.parametrize("case", ja.cases(CFG))
def test_clean_cases_pass_on_both_kernels(case: str) -> None:
    out = _run(case)
    assert out.verdict is Verdict.PASS, out.mismatches
    assert out.params["backends"] == KERNELS and out.params["skipped"] == {}
    assert len(out.output_hash) == 32 and out.metrics["tflops"] > 0 and out.metrics["tflops_jax_nn"] > 0
    assert out.params["mode"] == ("exact" if case.endswith("/exact") else "random")
    # the torch probe's params, plus the backend's
    assert {"b", "hq", "hkv", "s", "d", "dtype", "causal", "mask", "gqa", "scale", "timed_backend",
            "flops_fwd_bwd"} <= set(out.params) and out.params["backend"] == "jax"


def test_the_hash_is_the_same_on_a_second_run() -> None:
    assert _run("bfloat16/d32/causal").output_hash == _run("bfloat16/d32/causal").output_hash


def test_an_injected_flip_is_caught_in_out_with_its_place() -> None:
    out = _run("float32/d32/full", "bitflip:rank=0,bit=27")
    assert out.verdict is Verdict.WRONG
    for kernel in KERNELS:  # the fault lands in every attention call, as torch's in every SDPA backend
        (ref,) = _by(out, Oracle.REFERENCE, kernel)
        assert ref.tensor == "out" and ref.bad_elements == 1 and len(ref.first_indices[0]) == 4


def test_cli_attention_fault_on_one_jax_device(tmp_path: Path) -> None:
    # 16 cases x 2 devices, ~35 s of CPU per device (docs/jax.md): a loaded 2-core host needs the time
    rc, data, out = run_jax(tmp_path, 2, "--probes", "attention", "--inject", "bitflip:rank=1,bit=27", timeout=480)
    assert rc == 1, out[-3000:]
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "wrong"}
    cases = {c["case"]: c for c in probe_of(data, 1, "attention")["details"]["cases"]}
    names = ja.cases(base.get("attention").config("quick", "cpu", frozenset()))
    assert set(cases) == set(names) and "float32/d64/exact" in names
    # bit 27 exists in float32 only: the float32 cases are wrong, each through its own oracle
    assert {c: v["verdict"] for c, v in cases.items()} == {c: "wrong" if c.startswith("float32") else "pass"
                                                           for c in names}
    assert ("exact", "out") in {(m["oracle"], m["tensor"]) for m in cases["float32/d64/exact"]["mismatches"]}
    assert ("fp64_reference", "out") in {(m["oracle"], m["tensor"]) for m in cases["float32/d64/mask"]["mismatches"]}


# ---- the torch probe's inputs, bit for bit ------------------------------------------------------------------------


def _bits(x: object) -> np.ndarray:
    """The bits of a torch tensor or a JAX/numpy array, as signed integers of its width."""
    if isinstance(x, torch.Tensor):
        x = x.contiguous()
        return x.view({2: torch.int16, 4: torch.int32}[x.element_size()]).numpy()
    a = np.asarray(x)
    return a.view({2: np.int16, 4: np.int32}[a.dtype.itemsize])


SHAPES = [("float32", ta.Shape(b=2, hq=4, hkv=2, s=32, d=16), 7),
          ("bfloat16", ta.Shape(b=1, hq=4, hkv=1, s=70, d=24), (1 << 40) + 3)]  # s not a power of 2; seed > 2**32


def _on_jax(build: object, shape: ta.Shape, var: ta.Variant, dtype: str, seed: int) -> ta.Inputs:
    """attention.exact_on / random_on on the first JAX device (one compiled program)."""
    jb.init()
    return build(JaxBackend(jax.devices()[0]), shape, var, dtype, seed)  # type: ignore[operator]


@pytest.mark.parametrize(("dtype", "shape", "seed"), SHAPES)
def test_exact_inputs_and_expected_outputs_are_bit_identical_to_torch(dtype: str, shape: ta.Shape, seed: int) -> None:
    t = ta.exact_inputs(shape, ta.VARIANTS["exact"], getattr(torch, dtype), seed, "cpu")
    j = _on_jax(ta.exact_on, shape, ta.VARIANTS["exact"], dtype, seed)
    assert j.scale == t.scale == ta.EXACT_SCALE and j.mask is None
    for name in ("q", "k", "v", "dout"):
        assert np.array_equal(_bits(getattr(t, name)), _bits(getattr(j, name))), name
    for name in ta.TENSORS:
        assert np.asarray(j.expected[name]).dtype.name == dtype
        assert np.array_equal(_bits(t.expected[name]), _bits(j.expected[name])), name


@pytest.mark.parametrize(("dtype", "shape", "seed"), SHAPES)
def test_random_inputs_and_the_mask_are_bit_identical_to_torch(dtype: str, shape: ta.Shape, seed: int) -> None:
    t = ta.random_inputs(shape, ta.VARIANTS["mask"], getattr(torch, dtype), seed, "cpu")
    j = _on_jax(ta.random_on, shape, ta.VARIANTS["mask"], dtype, seed)
    for name in ("q", "k", "v", "dout", "mask"):
        assert np.array_equal(_bits(getattr(t, name)), _bits(getattr(j, name))), name
    m = np.asarray(j.mask).astype(np.float64)
    pad = np.isneginf(m)
    assert 0.05 < pad.mean() < 0.2 and not pad.diagonal().any()  # one key in eight, never the diagonal
    assert np.abs(m[~pad]).max() <= 2.0
    assert _on_jax(ta.random_on, shape, ta.VARIANTS["causal"], dtype, seed).mask is None


@pytest.mark.parametrize(("dtype", "shape", "seed"), SHAPES)
def test_the_numpy_reference_backend_builds_the_same_inputs_as_torch_and_jax(dtype: str, shape: ta.Shape,
                                                                           seed: int) -> None:
    # attention.random_on / exact_on are written once against probes/backends: the reference runs them too
    pytest.importorskip("ml_dtypes", reason="bfloat16 on the host needs ml_dtypes")
    from chipcheck.probes.backends.numpy import NumpyBackend

    for variant in ("exact", "mask", "causal"):
        var = ta.VARIANTS[variant]
        build_t, build_on = (ta.exact_inputs, ta.exact_on) if var.exact else (ta.random_inputs, ta.random_on)
        t = build_t(shape, var, getattr(torch, dtype), seed, "cpu")
        j = _on_jax(build_on, shape, var, dtype, seed)
        n = build_on(NumpyBackend(), shape, var, dtype, seed)
        assert n.scale == t.scale and (n.mask is None) == (t.mask is None) and n.expected.keys() == t.expected.keys()
        for name in ("q", "k", "v", "dout", "mask"):
            if getattr(n, name) is not None:
                assert isinstance(getattr(n, name), np.ndarray) and getattr(n, name).dtype.name == dtype
                assert np.array_equal(_bits(getattr(n, name)), _bits(getattr(t, name))), (variant, name)
                assert np.array_equal(_bits(getattr(n, name)), _bits(getattr(j, name))), (variant, name)
        for name in n.expected:
            assert np.array_equal(_bits(n.expected[name]), _bits(t.expected[name])), (variant, name)
            assert np.array_equal(_bits(n.expected[name]), _bits(j.expected[name])), (variant, name)


def test_exact_needs_a_head_dim_that_holds_the_key_codes() -> None:
    # seq 1000: 10-bit codes, 5 base-4 digits, 2 * 5 + 1 dims (one rule and message on every backend)
    with pytest.raises(InvalidConfig, match=r"head dim 8 too small for seq 1000 \(needs 11\)"):
        _on_jax(ta.exact_on, ta.Shape(b=1, hq=2, hkv=1, s=1000, d=8), ta.VARIANTS["exact"], "float32", 0)
    with pytest.raises(InvalidConfig, match=r"head dim 8 too small for seq 1000 \(needs 11\)"):
        ta.exact_inputs(ta.Shape(b=1, hq=2, hkv=1, s=1000, d=8), ta.VARIANTS["exact"], torch.float32, 0, "cpu")


# ---- the new detectors: exact one-hot and the additive mask --------------------------------------------------------


def test_exact_catches_an_injected_flip_with_its_bit_and_place() -> None:
    out = _run("float32/d32/exact", "bitflip:rank=0,bit=20,op=attention")
    assert out.verdict is Verdict.WRONG
    for kernel in KERNELS:
        (ex,) = _by(out, Oracle.EXACT, kernel)
        assert ex.tensor == "out" and ex.bad_elements == 1 and set(ex.bit_histogram) == {20}  # per bad round
        assert len(ex.first_indices[0]) == 4
    assert not any(m.oracle is Oracle.REFERENCE for m in out.mismatches)  # no tolerance in exact mode


def test_exact_checks_the_lowest_gradient_bit() -> None:
    out = _run("bfloat16/d32/exact", "bitflip:rank=0,bit=2,op=attention,output=3")  # dv's lowest bit it can lose
    assert out.verdict is Verdict.WRONG
    (m,) = _by(out, Oracle.EXACT, "formula")
    assert m.tensor == "dv" and m.bad_elements == 1 and set(m.bit_histogram) == {2}


def test_exact_folds_signed_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ja._call

    def negated_dq(*args: object) -> object:
        call = real(*args)  # type: ignore[arg-type]

        def run() -> object:
            res, t_f, t_b = call()
            res["dq"] = -res["dq"]  # -0 everywhere: the same value, another sign bit
            return res, t_f, t_b

        return run

    monkeypatch.setattr(ja, "_call", negated_dq)
    out = _run("bfloat16/d32/exact")
    assert out.verdict is Verdict.PASS, out.mismatches


def test_exact_holds_the_second_kernel_to_the_expected_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    real = jax.nn.dot_product_attention

    def off_a_little(*args: object, **kw: object) -> object:
        return real(*args, **kw).at[0, 5, 1, 3].add(2.0**-20)  # more than an ulp of any |out| <= 1

    monkeypatch.setattr(jax.nn, "dot_product_attention", off_a_little)
    out = _run("float32/d32/exact")
    assert out.verdict is Verdict.WRONG
    assert {(m.oracle, m.tensor) for m in out.mismatches} == {(Oracle.EXACT, "out")}
    (m,) = out.mismatches
    assert m.first_indices == [[0, 1, 5, 3]] and "backend=jax_nn" in m.note


def test_mask_catches_an_injected_flip_in_bfloat16() -> None:
    out = _run("bfloat16/d32/mask", "bitflip:rank=0,bit=14,op=attention")  # an exponent bit
    assert out.verdict is Verdict.WRONG and out.params["mask"] is True
    ref = next(m for m in out.mismatches if m.oracle is Oracle.REFERENCE)
    assert ref.tensor == "out" and ref.bad_elements == 1


def test_the_mask_reaches_both_kernels_and_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # clean (test above): formula with mask == jax.nn with bias == reference with mask. Drop the mask
    # from one kernel at a time and that kernel alone is flagged, so every one of them really uses it.
    real_formula, real_dpa = ja._formula, jax.nn.dot_product_attention
    monkeypatch.setattr(ja, "_formula", lambda q, k, v, mask, causal, scale: real_formula(q, k, v, None, causal, scale))
    out = _run("float32/d32/mask")
    assert {m.tensor for m in _by(out, Oracle.REFERENCE, "formula")} == set(ta.TENSORS)
    assert not _by(out, Oracle.REFERENCE, "jax_nn")
    monkeypatch.setattr(ja, "_formula", real_formula)
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, bias=None, **kw: real_dpa(*a, **kw))
    out = _run("float32/d32/mask")
    assert {m.tensor for m in _by(out, Oracle.REFERENCE, "jax_nn")} == set(ta.TENSORS)
    assert not _by(out, Oracle.REFERENCE, "formula")


@pytest.mark.parametrize(("case", "output", "tensor", "oracle"), [
    ("float32/d32/exact", 1, "dq", Oracle.EXACT), ("float32/d32/full", 3, "dv", Oracle.REFERENCE),
    ("bfloat16/d32/causal", 2, "dk", Oracle.REFERENCE)])
def test_a_fault_in_a_gradient_is_caught_there_with_its_bits(case: str, output: int, tensor: str,
                                                             oracle: Oracle) -> None:
    bit = 30 if case.startswith("float32") else 14  # an exponent bit: far outside any tolerance
    out = _run(case, f"bitflip:rank=0,bit={bit},op=attention,output={output}")
    assert out.verdict is Verdict.WRONG
    for kernel in KERNELS:
        (m,) = _by(out, oracle, kernel)
        assert m.tensor == tensor and m.bad_elements == 1 and bit in m.bit_histogram
        assert len(m.expected_bits) == len(m.actual_bits) == 1 and m.expected_bits != m.actual_bits
