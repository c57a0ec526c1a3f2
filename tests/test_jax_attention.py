"""Attention through JAX: the torch probe's exact one-hot and random (full/causal/mask) cases, the formula and
its gradients against their golden values, jax.nn as a second opinion, and faults caught."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from jax_cli import run_jax  # noqa: E402

from chipcheck.probes import attention as ta  # noqa: E402
from chipcheck.probes import faults  # noqa: E402
from chipcheck.probes import jax_attention as ja  # noqa: E402
from chipcheck.probes import jax_backend as jb  # noqa: E402
from chipcheck.probes.base import CaseOutcome, InvalidConfig  # noqa: E402
from chipcheck.results import Oracle, Verdict  # noqa: E402

CFG = ja.Config(seq=32, head_dim=32)


def _run(case: str, spec: str | None = None) -> CaseOutcome:
    jb.init()
    inj = jb.Injector.for_rank(faults.parse(spec) if spec else [], 0, "attention")
    return ja.run_case(jax.devices()[0], CFG, case, 0, inj)


@pytest.mark.parametrize("case", ja.cases())
def test_clean_cases_pass_with_a_second_opinion(case: str) -> None:
    out = _run(case)
    assert out.verdict is Verdict.PASS, out.mismatches
    assert out.params["cross_backend"] == "jax.nn.dot_product_attention"
    assert len(out.output_hash) == 32 and out.metrics["tflops"] > 0
    assert out.params["mode"] == ("exact" if case.endswith("/exact") else "random")


def test_the_hash_is_the_same_on_a_second_run() -> None:
    assert _run("bfloat16/causal").output_hash == _run("bfloat16/causal").output_hash


def test_an_injected_flip_is_caught_in_out_with_its_place() -> None:
    out = _run("float32/full", "bitflip:rank=0,bit=27")
    assert out.verdict is Verdict.WRONG
    ref = next(m for m in out.mismatches if m.oracle is Oracle.REFERENCE)
    assert ref.tensor == "out" and ref.bad_elements == 1 and len(ref.first_indices[0]) == 4


def test_the_reference_gradients_are_the_adjoint() -> None:
    # finite differences of the float64 formula agree with the hand-written adjoint
    rng = np.random.default_rng(0)
    q, do = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 5, 4))
    k, v = rng.standard_normal((1, 1, 5, 4)), rng.standard_normal((1, 1, 5, 4))
    ref = ja._reference(q, k, v, do, causal=True)
    eps = 1e-6
    for name, x in (("dq", q), ("dk", k), ("dv", v)):
        i = (0, 0, 3, 2)
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        args_p = {"dq": (xp, k, v), "dk": (q, xp, v), "dv": (q, k, xp)}[name]
        args_m = {"dq": (xm, k, v), "dk": (q, xm, v), "dv": (q, k, xm)}[name]
        fd = ((ja._reference(*args_p, do, causal=True)["out"] - ja._reference(*args_m, do, causal=True)["out"])
              * do).sum() / (2 * eps)
        assert math.isclose(fd, ref[name][i], rel_tol=1e-5, abs_tol=1e-8), name


def test_cli_attention_fault_on_one_jax_device(tmp_path: Path) -> None:
    rc, data, out = run_jax(tmp_path, 2, "--probes", "attention", "--inject", "bitflip:rank=1,bit=27")
    assert rc == 1, out[-3000:]
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "wrong"}
    # besides its attention entry, a device may carry a speed note (a busy host made it a speed suspect:
    # CI, 2026-12-02, "0.45x its peers ... not called slow"); a note, never a verdict against it
    probes = data["devices"][1]["probes"]
    (probe,) = [p for p in probes if p["probe"] == "attention"]
    assert all(p["probe"] == "retest" and p["verdict"] == "pass" for p in probes if p is not probe), probes
    cases = {c["case"]: c for c in probe["details"]["cases"]}
    assert set(cases) == set(ja.cases())
    # bit 27 exists in float32 only: the float32 cases are wrong, each through its own oracle
    assert {c: v["verdict"] for c, v in cases.items()} == {c: "wrong" if c.startswith("float32") else "pass"
                                                           for c in ja.cases()}
    assert ("exact", "out") in {(m["oracle"], m["tensor"]) for m in cases["float32/exact"]["mismatches"]}
    assert ("fp64_reference", "out") in {(m["oracle"], m["tensor"]) for m in cases["float32/mask"]["mismatches"]}


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


@pytest.mark.parametrize(("dtype", "shape", "seed"), SHAPES)
def test_exact_inputs_and_expected_outputs_are_bit_identical_to_torch(dtype: str, shape: ta.Shape, seed: int) -> None:
    jb.init()
    t = ta.exact_inputs(shape, ta.VARIANTS["exact"], getattr(torch, dtype), seed, "cpu")
    j = ja.exact_inputs(shape, ta.VARIANTS["exact"], getattr(jax.numpy, dtype), seed, jax.devices()[0])
    assert j.scale == t.scale == ta.EXACT_SCALE and j.mask is None
    for name in ("q", "k", "v", "dout"):
        assert np.array_equal(_bits(getattr(t, name)), _bits(getattr(j, name))), name
    for name in ja.TENSORS:
        assert j.expected[name].dtype.name == dtype
        assert np.array_equal(_bits(t.expected[name]), _bits(j.expected[name])), name


@pytest.mark.parametrize(("dtype", "shape", "seed"), SHAPES)
def test_random_inputs_and_the_mask_are_bit_identical_to_torch(dtype: str, shape: ta.Shape, seed: int) -> None:
    jb.init()
    t = ta.random_inputs(shape, ta.VARIANTS["mask"], getattr(torch, dtype), seed, "cpu")
    j = ja.random_inputs(shape, ta.VARIANTS["mask"], getattr(jax.numpy, dtype), seed, jax.devices()[0])
    for name in ("q", "k", "v", "dout", "mask"):
        assert np.array_equal(_bits(getattr(t, name)), _bits(getattr(j, name))), name
    m = np.asarray(j.mask).astype(np.float64)
    pad = np.isneginf(m)
    assert 0.05 < pad.mean() < 0.2 and not pad.diagonal().any()  # one key in eight, never the diagonal
    assert np.abs(m[~pad]).max() <= 2.0
    assert ja.random_inputs(shape, ta.VARIANTS["causal"], getattr(jax.numpy, dtype), seed).mask is None


@pytest.mark.parametrize(("dtype", "shape", "seed"), SHAPES)
def test_the_numpy_reference_backend_builds_the_same_inputs_as_torch_and_jax(dtype: str, shape: ta.Shape,
                                                                           seed: int) -> None:
    # attention.random_on / exact_on are written once against probes/backends: the reference runs them too
    pytest.importorskip("ml_dtypes", reason="bfloat16 on the host needs ml_dtypes")
    from chipcheck.probes.backends.numpy import NumpyBackend

    jb.init()
    for variant in ("exact", "mask", "causal"):
        var = ta.VARIANTS[variant]
        build_t, build_j, build_n = ((ta.exact_inputs, ja.exact_inputs, ta.exact_on) if var.exact else
                                     (ta.random_inputs, ja.random_inputs, ta.random_on))
        t = build_t(shape, var, getattr(torch, dtype), seed, "cpu")
        j = build_j(shape, var, getattr(jax.numpy, dtype), seed, jax.devices()[0])
        n = build_n(NumpyBackend(), shape, var, dtype, seed)
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
    jb.init()
    # seq 1000: 10-bit codes, 5 base-4 digits, 2 * 5 + 1 dims (the torch path's rule and message)
    with pytest.raises(InvalidConfig, match=r"head dim 8 too small for seq 1000 \(needs 11\)"):
        ja.exact_inputs(ta.Shape(b=1, hq=2, hkv=1, s=1000, d=8), ta.VARIANTS["exact"], jax.numpy.float32, 0)
    with pytest.raises(InvalidConfig, match=r"head dim 8 too small for seq 1000 \(needs 11\)"):
        ta.exact_inputs(ta.Shape(b=1, hq=2, hkv=1, s=1000, d=8), ta.VARIANTS["exact"], torch.float32, 0, "cpu")


# ---- the new detectors: exact one-hot and the additive mask --------------------------------------------------------


def test_exact_catches_an_injected_flip_with_its_bit_and_place() -> None:
    out = _run("float32/exact", "bitflip:rank=0,bit=20,op=attention")
    assert out.verdict is Verdict.WRONG
    ex = next(m for m in out.mismatches if m.oracle is Oracle.EXACT)
    assert ex.tensor == "out" and ex.bad_elements == 1 and ex.bit_histogram == {20: 1}
    assert len(ex.first_indices[0]) == 4
    assert not any(m.oracle is Oracle.REFERENCE for m in out.mismatches)  # no tolerance in exact mode
    assert not any("dot_product_attention" in m.note for m in out.mismatches)  # the fault hit the formula only


def test_exact_checks_every_gradient_bit_and_folds_signed_zeros() -> None:
    jb.init()
    shape = ta.Shape(b=1, hq=2, hkv=1, s=16, d=16)
    inp = ja.exact_inputs(shape, ta.VARIANTS["exact"], jax.numpy.bfloat16, 5)
    hosts = {n: e.copy() for n, e in inp.expected.items()}
    hosts["dq"] = -hosts["dq"]  # -0 everywhere: the same value, another sign bit
    assert ja.exact_mismatches(inp.expected, hosts) == []
    dv = hosts["dv"].view(np.int16)
    dv[0, 0, 3, 5] ^= 1 << 2  # the lowest bit a bfloat16 gradient can lose
    (m,) = ja.exact_mismatches(inp.expected, hosts)
    assert m.oracle is Oracle.EXACT and m.tensor == "dv" and m.first_indices == [[0, 0, 3, 5]]
    assert m.bit_histogram == {2: 1}


def test_exact_holds_the_second_opinion_to_the_expected_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    real = jax.nn.dot_product_attention

    def off_by_one_ulp(*args: object, **kw: object) -> object:
        o = real(*args, **kw)
        return o.at[0, 5, 1, 3].set(jax.numpy.nextafter(o[0, 5, 1, 3], jax.numpy.inf))

    monkeypatch.setattr(jax.nn, "dot_product_attention", off_by_one_ulp)
    out = _run("float32/exact")
    assert out.verdict is Verdict.WRONG
    (m,) = out.mismatches
    assert m.oracle is Oracle.EXACT and m.tensor == "out" and m.first_indices == [[0, 1, 5, 3]]
    assert "backend=jax.nn.dot_product_attention" in m.note


def test_mask_catches_an_injected_flip_in_bfloat16() -> None:
    out = _run("bfloat16/mask", "bitflip:rank=0,bit=14,op=attention")  # an exponent bit
    assert out.verdict is Verdict.WRONG and out.params["mask"] is True
    ref = next(m for m in out.mismatches if m.oracle is Oracle.REFERENCE)
    assert ref.tensor == "out" and ref.bad_elements == 1


def test_the_mask_reaches_the_formula_the_reference_and_the_second_opinion(monkeypatch: pytest.MonkeyPatch) -> None:
    # clean (test above): formula with mask == reference with mask == jax.nn with bias. Drop the mask
    # from one side at a time and that side is flagged, so every one of them really uses it.
    real_formula, real_dpa = ja._formula, jax.nn.dot_product_attention
    monkeypatch.setattr(ja, "_formula", lambda *a, **kw: real_formula(*a[:6], None, *a[7:], **kw))
    out = _run("float32/mask")
    assert {m.tensor for m in out.mismatches if m.oracle is Oracle.REFERENCE} == set(ja.TENSORS)
    assert not any(m.oracle is Oracle.CROSS_BACKEND for m in out.mismatches)
    monkeypatch.setattr(ja, "_formula", real_formula)
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, bias=None, **kw: real_dpa(*a, **kw))
    out = _run("float32/mask")
    assert [(m.oracle, m.tensor) for m in out.mismatches] == [(Oracle.CROSS_BACKEND, "out")]


@pytest.mark.parametrize(("case", "output", "tensor", "oracle"), [
    ("float32/exact", 1, "dq", Oracle.EXACT), ("float32/full", 3, "dv", Oracle.REFERENCE),
    ("bfloat16/causal", 2, "dk", Oracle.REFERENCE)])
def test_a_fault_in_a_gradient_is_caught_there_with_its_bits(case: str, output: int, tensor: str,
                                                             oracle: Oracle) -> None:
    bit = 30 if case.startswith("float32") else 14  # an exponent bit: far outside any tolerance
    out = _run(case, f"bitflip:rank=0,bit={bit},op=attention,output={output}")
    assert out.verdict is Verdict.WRONG
    m = next(m for m in out.mismatches if m.oracle is oracle)
    assert m.tensor == tensor and m.bad_elements == 1 and bit in m.bit_histogram
    assert len(m.expected_bits) == len(m.actual_bits) == 1 and m.expected_bits != m.actual_bits
    assert not any(x.tensor == "out" for x in out.mismatches if x.oracle is oracle)
