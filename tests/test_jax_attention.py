"""Attention through JAX: the formula and its gradients against float64, jax.nn as a second opinion."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from test_jax_backend import _cli  # noqa: E402

from chipcheck.probes import faults  # noqa: E402
from chipcheck.probes import jax_attention as ja  # noqa: E402
from chipcheck.probes import jax_backend as jb  # noqa: E402
from chipcheck.results import Oracle, Verdict  # noqa: E402

CFG = ja.Config(seq=32, head_dim=32)


def _run(case: str, spec: str | None = None) -> object:
    jb.init()
    inj = jb.Injector.for_rank(faults.parse(spec) if spec else [], 0, "attention")
    return ja.run_case(jax.devices()[0], CFG, case, 0, inj)


@pytest.mark.parametrize("case", ja.cases())
def test_clean_cases_pass_with_a_second_opinion(case: str) -> None:
    out = _run(case)
    assert out.verdict is Verdict.PASS, out.mismatches
    assert out.params["cross_backend"] == "jax.nn.dot_product_attention"
    assert len(out.output_hash) == 32 and out.metrics["tflops"] > 0


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
    rc, data, out = _cli(tmp_path, "--probes", "attention", "--inject", "bitflip:rank=2,bit=27")
    assert rc == 1, out[-3000:]
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "pass", 2: "wrong", 3: "pass"}
