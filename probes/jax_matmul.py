"""The matmul probe through JAX/XLA: the same cases, inputs, oracles and hashes as probes/matmul.py.

- `exact`: the Sylvester-Hadamard inputs of matmul.hadamard_inputs, built on the JAX device from
  the same counter-based signs and permutations, so A, B and the closed-form C are bit-identical
  to the torch path's; any differing output bit is an error, in any summation order.
- `random`: uniform full-mantissa A and B = A with its rows reversed; Freivalds (right-hand sides
  computed on the device in float32, compared in float64), a sampled float64 reference on the
  host, non-finite values, repeat-determinism and the SHA-256 consensus hash of the output bytes.

The kernel is `lax.dot_general` with `precision=HIGHEST` (without it a TPU rounds float32 inputs
to bfloat16 passes and the float32 case would test something else) and
`preferred_element_type` = the output dtype the torch path produces (C in the input dtype).
Checks run on a host copy of C through probes/np_oracles.py; the copy is O(n^2), like the checks.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..results import Oracle
from . import generator as g
from . import jax_backend as jb
from . import np_oracles as npo
from .base import CaseOutcome, InvalidConfig, Unsupported
from .matmul import MatmulProbe, _apply_perm, _finish, _keep, _perm

DTYPES = ("float32", "bfloat16", "float16")
OP = "dot_general"


def cases(cfg: MatmulProbe.Config) -> list[str]:
    """The torch path's case names, for the dtypes JAX runs here (tf32/fp8 need device-specific kernels)."""
    return [f"{d}/{mode}" for d in cfg.sizes if d in DTYPES for mode in ("exact", "random")]


def _kernel(out_dtype: Any) -> Any:
    import jax
    from jax import lax

    def mm(a: Any, b: Any) -> Any:
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                               preferred_element_type=out_dtype)

    return jax.jit(mm)


def sylvester(n: int, device: Any = None) -> Any:
    """matmul.sylvester in jax.numpy: H[r, c] = (-1)^popcount(r & c), by doubling."""
    import jax.numpy as jnp

    with jb._on(device):
        h = jnp.ones((1, 1), dtype=jnp.float32)
        while h.shape[0] < n:
            h = jnp.concatenate([jnp.concatenate([h, h], axis=1), jnp.concatenate([h, -h], axis=1)], axis=0)
        return h


def hadamard_inputs(n: int, seed: int, device: Any = None) -> tuple[Any, Any, Any]:
    """matmul.hadamard_inputs on a JAX device: (A, B, expected C) in float32, bit-identical."""
    import jax.numpy as jnp

    with jb._on(device):
        idx = jnp.arange(n, dtype=jnp.int64)
        ra = _apply_perm(idx, n, _perm(n, seed, "hadamard/rows"))
        cb = _apply_perm(idx, n, _perm(n, seed, "hadamard/cols"))
        ma = 1 + ((g.hash_indices(g.key(seed, "hadamard/ma"), idx, n - 1) >> 3) & 1)
        sa = jb.signs((n,), seed, "hadamard/sa", device=device) * ma
        sb = jb.signs((n,), seed, "hadamard/sb", device=device)
        h = sylvester(n, device)
        a = h[ra] * sa[:, None].astype(jnp.float32)
        b = h[:, cb] * sb[None, :].astype(jnp.float32)
        cols = jnp.zeros(n, dtype=jnp.int64).at[cb].set(idx)[ra]  # inverse of pb at pa(i)
        expected = jnp.zeros((n, n), dtype=jnp.float32).at[idx, cols].set((sa * sb[cols] * n).astype(jnp.float32))
        return a, b, expected


def run_case(device: Any, cfg: MatmulProbe.Config, case: str, seed: int, inj: jb.Injector) -> CaseOutcome:
    """One matmul case on one JAX device; `seed` is the run's base seed (the case stream is mixed in here)."""
    import jax
    import jax.numpy as jnp

    dtype_name, _, mode = case.partition("/")
    if dtype_name not in cfg.sizes or mode not in ("exact", "random"):
        raise InvalidConfig(f"unknown matmul case {case!r}")
    if dtype_name not in DTYPES:
        raise Unsupported(f"{dtype_name} GEMM is not implemented on the JAX path (float32, bfloat16, float16)")
    n = cfg.sizes[dtype_name]
    seed = seed ^ g.stream_id(case)
    dt = getattr(jnp, dtype_name)
    kernel = _kernel(dt)
    out = CaseOutcome(case=case, params={"m": n, "n": n, "k": n, "dtype": dtype_name, "mode": mode,
                                         "out_dtype": dtype_name, "precision": "HIGHEST",
                                         "backend": "jax", "jax_device": str(device)})
    if mode == "exact":
        a32, b32, e32 = hadamard_inputs(n, seed, device)
        a, b = (jax.device_put(x.astype(dt), device) for x in (a32, b32))
        expected = jb.to_host(e32.astype(dt))

        def check(c: np.ndarray, r: int) -> bool:
            m = npo.compare_bits(expected, c, tensor="C", oracle=Oracle.EXACT)
            if m is not None:
                _keep(out, m, r)
            return m is not None
    else:
        a, b, check = _random_setup(device, cfg, out, n, dt, seed)
    times = _repeat(cfg, kernel, a, b, out, check, inj)
    _finish(out, times, n)
    return out


def _random_setup(device: Any, cfg: MatmulProbe.Config, out: CaseOutcome, n: int, dt: Any,
                  seed: int) -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp
    import torch
    from jax import lax

    a32 = jb.uniform((n, n), seed, "matmul/A", device=device)
    a, b = (jax.device_put(x.astype(dt), device) for x in (a32, a32[::-1]))
    # The oracles reason about the values the kernel was actually given (after rounding to dt).
    af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    x = jb.signs((n,), seed, "freivalds/x", device=device).astype(jnp.float32)
    y = jb.signs((n,), seed, "freivalds/y", device=device).astype(jnp.float32)
    # Right-hand sides and expected row/column norms in float32 on the device (as the torch path),
    # never from C: a corrupted huge value must not widen its own tolerance.
    abx = jnp.dot(af, jnp.dot(bf, x, precision=hi), precision=hi)
    yab = jnp.dot(jnp.dot(y, af, precision=hi), bf, precision=hi)
    a2, b2 = af * af, bf * bf
    row_c2 = jnp.dot(a2, b2.sum(axis=1), precision=hi)
    col_c2 = jnp.dot(a2.sum(axis=0), b2, precision=hi)
    out_dtype = np.dtype(a.dtype)  # C comes out in the input dtype, as on the torch path
    row_tol, col_tol = npo.tolerances(jb.to_host(row_c2).astype(np.float64), jb.to_host(col_c2).astype(np.float64),
                                      n, n, out_dtype, cfg.sigmas, 0.0)
    plan = npo.FreivaldsPlan(x=jb.to_host(x), y=jb.to_host(y), abx=jb.to_host(abx).astype(np.float64),
                             yab=jb.to_host(yab).astype(np.float64), row_tol=row_tol, col_tol=col_tol,
                             a64=jb.to_host(af).astype(np.float64), b64=jb.to_host(bf).astype(np.float64))
    rows = torch.linspace(0, n - 1, min(cfg.sample_rows, n)).long().tolist()  # the torch path's rows
    first: list[np.ndarray] = []
    repeat0_bad = [False]

    def check(c: np.ndarray, r: int) -> bool:
        if r > 0 and npo.same_bits(c, first[0]):
            return repeat0_bad[0]  # the same bits every oracle already checked
        bad = False
        fr = npo.freivalds(plan, c, tensor="C")
        for m in filter(None, [
            npo.nonfinite(c, tensor="C") if fr is not None else None,
            fr,
            npo.sampled_reference(plan.a64, plan.b64, c, out_dtype, rows=rows, tensor="C", sigmas=cfg.sigmas)
            if r == 0 else None,
        ]):
            _keep(out, m, r)
            bad = True
        if r == 0:
            first.append(c)
            out.output_hash = npo.array_hash(c)
            repeat0_bad[0] = bad
        else:
            rep = npo.compare_bits(first[0], c, tensor="C", oracle=Oracle.REPEAT)
            if rep is not None:
                out.nondeterministic = True
                _keep(out, rep, r)
        return bad

    return a, b, check


def _repeat(cfg: MatmulProbe.Config, kernel: Any, a: Any, b: Any, out: CaseOutcome, check: Any,
            inj: jb.Injector) -> list[float]:
    """Warm up (compile), then `repeats` timed calls, each checked on its host copy."""
    jb.timed(lambda: kernel(a, b))  # compile + warm-up, outside the faults as on the torch path
    times: list[float] = []
    check_s = 0.0
    for r in range(max(cfg.repeats, 2)):
        c, dt = inj.call(OP, lambda: kernel(a, b))
        times.append(dt)
        t0 = time.perf_counter()
        host = inj.corrupt(jb.to_host(c))
        if check(host, r):
            out.repeats_bad += 1
        check_s += time.perf_counter() - t0
        out.repeats = r + 1
    out.metrics["check_ms"] = 1e3 * check_s / max(1, len(times))
    return times
