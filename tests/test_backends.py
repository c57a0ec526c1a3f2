"""The backend layer (probes/backends/): one matmul probe, run on torch, JAX and the numpy reference.

Same inputs bit for bit, clean runs pass everywhere, and an injected fault is caught on every
backend with the same diagnosis (the same element, bit, values and bit patterns).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from conftest import cpu_ctx

from chipcheck.probes import base, faults, matmul
from chipcheck.probes import jax_backend as jb
from chipcheck.probes.backends import oracles as ora
from chipcheck.probes.backends.base import Backend
from chipcheck.probes.backends.numpy import NumpyBackend
from chipcheck.probes.backends.torch import TorchBackend
from chipcheck.results import Oracle, Verdict

CFG = matmul.MatmulProbe.Config(sizes={"float32": 128, "bfloat16": 128, "float16": 64}, repeats=3, max_repeats=3)
BACKENDS = ["torch", "jax", "numpy"]


def _ctx(inject: str | None = None, seed: int = 7) -> base.ProbeContext:
    return cpu_ctx("matmul", inject, seed=seed)


def _backend(name: str, inject: str | None = None, seed: int = 7) -> Backend:
    """A backend with `inject` faults on, through each backend's own fault machinery."""
    if name == "torch":
        return TorchBackend.of(_ctx(inject, seed))
    pytest.importorskip("ml_dtypes", reason="bfloat16 on the host needs ml_dtypes")
    inj = jb.Injector.for_rank(faults.parse(inject), 0, "matmul") if inject else jb.Injector([])
    if name == "numpy":
        return NumpyBackend(inj)
    pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")
    jb.init()
    import jax

    from chipcheck.probes.backends.jax import JaxBackend

    return JaxBackend(jax.devices()[0], inj)


def _bits(bk: Backend, x: Any) -> list[int]:
    return bk.host_bits(x).reshape(-1).tolist()


def _diagnosis(out: Any) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(m.to_dict())) for m in out.mismatches]


@pytest.mark.parametrize("n", [2, 64, 256])
def test_exact_inputs_and_expected_bit_identical_on_every_backend(n: int) -> None:
    got = {name: (bk, matmul.hadamard(bk, n, 99)) for name in BACKENDS if (bk := _backend(name))}
    ref_bk, (a, b, e) = got["numpy"]
    # the closed form is the true product
    assert np.array_equal(a.astype(np.float64) @ b.astype(np.float64), e.astype(np.float64))
    for name, (bk, arrays) in got.items():
        for x, want in zip(arrays, (a, b, e), strict=True):
            assert bk.dtype_name(x) == "float32", name
            assert _bits(bk, x) == _bits(ref_bk, want), name


@pytest.mark.parametrize("case", matmul.MatmulProbe().cases(
    matmul.MatmulProbe.Config(sizes={"float32": 64, "bfloat16": 64, "float16": 32, "float8_e4m3fn": 32})))
def test_numpy_reference_backend_runs_every_case_clean(case: str) -> None:
    cfg = matmul.MatmulProbe.Config(sizes={"float32": 64, "bfloat16": 64, "float16": 32, "float8_e4m3fn": 32},
                                    repeats=3, max_repeats=3)
    out = matmul.run(_backend("numpy"), cfg, case, 7)
    assert out.verdict is Verdict.PASS, out.mismatches
    assert out.repeats == 3 and out.metrics["tflops_best"] > 0 and out.params["backend"] == "numpy"
    assert bool(out.output_hash) == case.endswith("random")


@pytest.mark.parametrize("name", BACKENDS)
def test_clean_run_is_not_flagged(name: str) -> None:
    for case in matmul.MatmulProbe().cases(CFG):
        out = matmul.run(_backend(name), CFG, case, 7)
        assert out.verdict is Verdict.PASS and not out.mismatches and not out.nondeterministic, (name, case)


def test_exact_case_output_is_the_same_bits_on_every_backend() -> None:
    # fleet consensus across backends is not promised for the random case (summation orders
    # differ), but the exact case has one right answer: every backend's hash of it is equal.
    hashes = set()
    for name in BACKENDS:
        bk = _backend(name)
        a, b, _ = matmul.hadamard(bk, 64, 5)
        k = bk.kernel("bfloat16")
        hashes.add(ora.array_hash(bk, k(*k.prepare(a, b))))
    assert len(hashes) == 1


@pytest.mark.parametrize("dtype, bit", [("float32", 20), ("float32", 31), ("bfloat16", 14)])
def test_injected_flip_caught_with_the_same_diagnosis_on_every_backend(dtype: str, bit: int) -> None:
    spec = f"bitflip:rank=0,bit={bit}"
    outs = {name: matmul.run(_backend(name, spec), CFG, f"{dtype}/exact", 7) for name in BACKENDS}
    for name, out in outs.items():
        assert out.verdict is Verdict.WRONG and out.repeats_bad == 3, name
        [m] = out.mismatches
        assert m.oracle is Oracle.EXACT and m.bit_histogram == {bit: 3} and m.bad_elements == 1, name
    want = _diagnosis(outs["torch"])
    assert _diagnosis(outs["jax"]) == want and _diagnosis(outs["numpy"]) == want


@pytest.mark.parametrize("name", BACKENDS)
def test_random_case_oracles_catch_faults_on_every_backend(name: str) -> None:
    out = matmul.run(_backend(name, "bitflip:rank=0,bit=30"), CFG, "float32/random", 7)
    assert out.verdict is Verdict.WRONG
    fr = next(m for m in out.mismatches if m.oracle is Oracle.FREIVALDS)
    rep = next(m for m in out.mismatches if m.oracle is Oracle.REPEAT)
    assert "bad_rows=1 bad_cols=1" in fr.note and fr.first_indices[0] in rep.first_indices
    nan = matmul.run(_backend(name, "nan:rank=0"), CFG, "bfloat16/random", 7)
    assert Oracle.NONFINITE in {m.oracle for m in nan.mismatches} and nan.verdict is Verdict.WRONG


def test_oracles_diagnose_the_same_on_every_backend() -> None:
    e = np.asarray(torch.linspace(-3, 3, 40 * 300).reshape(40, 300).numpy(), dtype=np.float32)
    a = e.copy()
    a.reshape(-1).view(np.int32)[[5, 999, 11999]] ^= 1 << 20
    a.reshape(-1)[7000] = np.nan
    a.reshape(-1)[3] = np.float32(1e-40)  # a subnormal must be reported as itself
    results = []
    for name in BACKENDS:
        bk = _backend(name)
        if name == "torch":
            ee, aa = torch.from_numpy(e), torch.from_numpy(a)
        elif name == "jax":
            import jax

            ee, aa = jax.device_put(e), jax.device_put(a)
        else:
            ee, aa = e, a
        results.append([json.dumps(m.to_dict()) if m else None for m in (
            ora.compare_bits(bk, ee, aa, tensor="C", tile=16), ora.nonfinite(bk, aa, tensor="C"))]
            + [ora.array_hash(bk, aa), ora.same_bits(bk, ee, aa), ora.same_bits(bk, aa, bk.copy(aa))])
    assert results[0] == results[1] == results[2]
    assert results[0][0] is not None and repr(float(np.float32(1e-40))) in results[0][0]
    assert results[0][3:] == [False, True]


def test_unsupported_kernels_raise_unsupported() -> None:
    with pytest.raises(base.Unsupported):
        _backend("numpy").kernel("tf32")
    with pytest.raises(base.Unsupported):
        TorchBackend("cpu").kernel("float8_e4m3fn")
    with pytest.raises(base.Unsupported, match="JAX path"):
        _backend("jax").kernel("tf32")
