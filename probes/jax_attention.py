"""The attention probe through JAX/XLA: the formula, its gradients, and jax.nn.dot_product_attention.

Per case (dtype x causal or not; grouped-query shapes, fewer KV heads than Q heads):
- the formula softmax(Q K^T / sqrt(d) + mask) V in JAX, forward and backward (jax.vjp: dq, dk, dv),
  float32 accumulation for 16-bit inputs;
- a float64 reference of the same formula and its gradients on the host (numpy), under a
  dtype-aware tolerance (the values the kernel was given: inputs rounded to the dtype first);
- `jax.nn.dot_product_attention` on the same inputs, where this JAX has it: the two
  implementations must agree within the same tolerance (oracle `cross_backend`);
- repeat-determinism (bit for bit) and a consensus hash over out, dq, dk, dv;
- the same fault hook as the JAX matmul probe, on the host copies (`op=attention` targets it).
Diagnosis names the tensor (out, dq, dk, dv) and the (batch, head, row, col) elements.
Not here (see docs/jax.md): the exact one-hot mode of the torch probe.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..results import Mismatch, Oracle
from . import jax_backend as jb
from . import np_oracles as npo
from .base import CaseOutcome, InvalidConfig

OP = "attention"
DTYPES = ("float32", "bfloat16")
_U = {"float32": 2.0**-24, "bfloat16": 2.0**-8}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    batch: int = 2
    """Batch size."""
    q_heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention: q_heads is a multiple)."""
    seq: int = 64
    """Sequence length."""
    head_dim: int = 64
    """Head dimension."""
    repeats: int = 2
    """Calls compared bit for bit."""
    sigmas: float = 8.0
    """Width of the tolerance against the float64 reference."""


def cases() -> list[str]:
    return [f"{d}/{v}" for d in DTYPES for v in ("full", "causal")]


def _formula(q: Any, k: Any, v: Any, causal: bool, xp: Any) -> Any:
    """softmax(q k^T / sqrt(d) + mask) v with k, v repeated over each KV head's query group."""
    group = q.shape[1] // k.shape[1]
    k = xp.repeat(k, group, axis=1)
    v = xp.repeat(v, group, axis=1)
    s = xp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[2]
        s = xp.where(xp.tril(xp.ones((n, n), dtype=bool)), s, -xp.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p = p / p.sum(axis=-1, keepdims=True)
    return xp.einsum("bhqk,bhkd->bhqd", p, v)


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray, causal: bool) -> dict[str, np.ndarray]:
    """Float64 out, dq, dk, dv of the formula, by hand (the adjoint of softmax attention)."""
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, kr) / math.sqrt(d)
    if causal:
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", p, vr)
    dp = np.einsum("bhqd,bhkd->bhqk", do, vr)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = np.einsum("bhqk,bhkd->bhqd", ds, kr) / math.sqrt(d)
    dkr = np.einsum("bhqk,bhqd->bhkd", ds, q) / math.sqrt(d)
    dvr = np.einsum("bhqk,bhqd->bhkd", p, do)
    fold = (b, k.shape[1], group, n, d)  # gradients of repeated KV heads add up
    return {"out": out, "dq": dq, "dk": dkr.reshape(fold).sum(axis=2), "dv": dvr.reshape(fold).sum(axis=2)}


def _mag(ref: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.sqrt(np.mean(v * v))) + 1e-30 for k, v in ref.items()}


def _compare(ref: np.ndarray, act: np.ndarray, tol: np.ndarray, tensor: str, oracle: Oracle,
             note: str = "") -> Mismatch | None:
    """Elements outside the tolerance, with (batch, head, row, col) indices; NaN is always outside."""
    act64 = act.astype(np.float64)
    err = np.abs(act64 - ref)
    bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    where = np.argwhere(bad)[:8]
    finite = err[np.isfinite(err)]
    return Mismatch(oracle=oracle, tensor=tensor, bad_elements=n_bad, total_elements=int(bad.size),
                    first_indices=[list(map(int, w)) for w in where],
                    expected=[float(ref[tuple(w)]) for w in where], actual=[float(act64[tuple(w)]) for w in where],
                    max_abs_error=float(finite.max()) if finite.size else math.inf, note=note)


def run_case(device: Any, cfg: Config, case: str, seed: int, inj: jb.Injector) -> CaseOutcome:
    """One attention case on one JAX device."""
    import jax
    import jax.numpy as jnp

    from . import generator as g

    dtype_name, _, variant = case.partition("/")
    if dtype_name not in DTYPES or variant not in ("full", "causal"):
        raise InvalidConfig(f"unknown attention case {case!r}")
    if cfg.q_heads % cfg.kv_heads:
        raise InvalidConfig("attention: q_heads must be a multiple of kv_heads")
    causal = variant == "causal"
    seed = seed ^ g.stream_id("attention/" + case)
    dt = getattr(jnp, dtype_name)
    qs = (cfg.batch, cfg.q_heads, cfg.seq, cfg.head_dim)
    ks = (cfg.batch, cfg.kv_heads, cfg.seq, cfg.head_dim)
    q, k, v, do = (jax.device_put(jb.uniform(s, seed, name, device=device).astype(dt), device)
                   for s, name in ((qs, "q"), (ks, "k"), (ks, "v"), (qs, "do")))

    def fwd_bwd(q: Any, k: Any, v: Any, do: Any) -> Any:
        def f(q: Any, k: Any, v: Any) -> Any:
            return _formula(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal,
                            jnp).astype(q.dtype)

        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    kernel = jax.jit(fwd_bwd)
    out = CaseOutcome(case=case, params={"batch": cfg.batch, "q_heads": cfg.q_heads, "kv_heads": cfg.kv_heads,
                                         "seq": cfg.seq, "head_dim": cfg.head_dim, "dtype": dtype_name,
                                         "causal": causal, "backend": "jax", "jax_device": str(device)})
    host_in = [jb.to_host(x).astype(np.float64) for x in (q, k, v, do)]
    ref = _reference(*host_in, causal=causal)
    mag = _mag(ref)
    u = _U[dtype_name]
    tols = {t: cfg.sigmas * u * math.sqrt(cfg.seq) * (np.abs(r) + mag[t]) for t, r in ref.items()}
    names = ("out", "dq", "dk", "dv")
    jb.timed(lambda: kernel(q, k, v, do))  # compile + warm-up, outside the faults
    first: list[np.ndarray] = []
    times = []
    for r in range(max(cfg.repeats, 2)):
        res, dt_s = inj.call(OP, lambda: kernel(q, k, v, do))
        times.append(dt_s)
        hosts = [jb.to_host(x) for x in res]
        inj.corrupt(hosts[0])  # the forward output, as a fault in the kernel would land
        bad = False
        for name, h in zip(names, hosts, strict=True):
            m = _compare(ref[name], h, tols[name], name, Oracle.REFERENCE, note=f"repeat={r}")
            if m is not None:
                bad = True
                if not any(x.tensor == name and x.oracle is m.oracle for x in out.mismatches):
                    out.mismatches.append(m)
        if r == 0:
            first = hosts
            out.output_hash = hashlib.sha256(b"".join(h.tobytes() for h in hosts)).hexdigest()[:32]
        else:
            for name, a, b in zip(names, first, hosts, strict=True):
                m = npo.compare_bits(a, b, tensor=name, oracle=Oracle.REPEAT)
                if m is not None:
                    out.nondeterministic = True
                    if not any(x.tensor == name and x.oracle is Oracle.REPEAT for x in out.mismatches):
                        out.mismatches.append(m)
        out.repeats_bad += int(bad)
        out.repeats = r + 1
    _cross_backend(out, q, k, v, causal, ref["out"], tols["out"])
    flops = 4 * cfg.batch * cfg.q_heads * cfg.seq**2 * cfg.head_dim * 3.5 * (0.5 if causal else 1.0)
    out.metrics["time_ms"] = 1e3 * float(np.median(times))
    out.metrics["tflops"] = flops / float(np.median(times)) / 1e12
    out.metrics["tflops_best"] = flops / min(times) / 1e12
    return out


def _cross_backend(out: CaseOutcome, q: Any, k: Any, v: Any, causal: bool, ref: np.ndarray, tol: np.ndarray) -> None:
    """jax.nn.dot_product_attention against the float64 formula, where this JAX has it."""
    import jax

    dpa = getattr(jax.nn, "dot_product_attention", None)
    if dpa is None:
        out.params["cross_backend"] = "absent"
        return
    # jax.nn takes (batch, seq, heads, dim) and groups KV heads itself
    t = (0, 2, 1, 3)
    try:
        o = dpa(q.transpose(t), k.transpose(t), v.transpose(t), is_causal=causal).transpose(t)
    except Exception as e:  # an implementation this backend cannot run: say so, do not fail the chip
        out.params["cross_backend"] = f"unavailable: {type(e).__name__}"
        return
    out.params["cross_backend"] = "jax.nn.dot_product_attention"
    m = _compare(ref, jb.to_host(o), tol, "out", Oracle.CROSS_BACKEND, note="jax.nn.dot_product_attention")
    if m is not None:
        out.mismatches.append(m)
        out.repeats_bad = out.repeats
