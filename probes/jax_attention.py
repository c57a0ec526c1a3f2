"""The attention probe through JAX/XLA: the formula, its gradients, and jax.nn.dot_product_attention.

Cases `<dtype>/<variant>`, the torch probe's variants (probes/attention.VARIANTS) with its inputs:
`exact` (causal, grouped-query), `full` (non-causal, one KV head per Q head), `causal`
(grouped-query), `mask` (additive float mask, grouped-query). Per case:
- the formula softmax(Q K^T scale + mask) V in JAX, forward and backward (jax.vjp: dq, dk, dv),
  float32 accumulation for 16-bit inputs, einsums at `precision=HIGHEST` (a TPU's DEFAULT would
  run float32 in bfloat16 passes);
- `exact`: the torch probe's one-hot inputs (`exact_inputs` here runs attention.exact_on, written
  once against probes/backends, compiled on the JAX device; q, k, v, dO and the expected outputs
  are bit-identical, see the test). Scale 256 makes every probability but the target key's exactly 0,
  so out = V[t(i)], dq = dk = 0, dv = sums of small-integer dO rows, exact in any summation order:
  any differing bit is an error (oracle `exact`, signed zeros folded: -0 == +0);
- random cases (`full`, `causal`, `mask`: attention.random_inputs' streams, the mask uniform
  [-2, 2) with -inf on one key in eight, never the diagonal): a float64 reference of the same
  formula and its gradients on the host (numpy), under a dtype-aware tolerance (the values the
  kernel was given: inputs rounded to the dtype first);
- `jax.nn.dot_product_attention` on the same inputs (scale, `bias=` the mask, `is_causal`), where
  this JAX has it: in `exact` its output must be the expected bits (oracle `exact`, note names it),
  otherwise it must agree with the float64 reference within the same tolerance (`cross_backend`);
- non-finite values, repeat-determinism (bit for bit) and a consensus hash over out, dq, dk, dv
  (the checks, rounds, hash and metrics are attention.run_flow, the torch probe's, on the host copies);
- the same fault hook as the JAX matmul probe, on the host copies (`op=attention`; `output=` picks out, dq, dk or dv).
Diagnosis names the tensor (out, dq, dk, dv) and the (batch, head, row, col) elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .. import generator as g
from ..results import Mismatch, Oracle
from . import jax_backend as jb
from . import np_oracles as npo
from .attention import VARIANTS, AttentionKernel, Inputs, Shape, Variant, exact_on, random_on, run_flow
from .backends.numpy import NumpyBackend
from .base import CaseOutcome, InvalidConfig
from .keeping import KeepPolicy, Stamp, keep

OP = "attention"
DTYPES = ("float32", "bfloat16")
TENSORS = ("out", "dq", "dk", "dv")
_U = {"float32": 2.0**-24, "bfloat16": 2.0**-8}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    batch: int = 2
    """Batch size."""
    q_heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads of the grouped-query variants (q_heads is a multiple)."""
    seq: int = 64
    """Sequence length."""
    head_dim: int = 64
    """Head dimension."""
    repeats: int = 2
    """Calls compared bit for bit."""
    sigmas: float = 8.0
    """Width of the tolerance against the float64 reference."""


def cases() -> list[str]:
    """`<dtype>/<variant>` for every dtype here and every variant of the torch probe."""
    return [f"{d}/{v}" for d in DTYPES for v in VARIANTS]


# ---- inputs: the torch probe's, built by its backend-generic builders on a JAX device -------


def random_inputs(shape: Shape, var: Variant, dtype: Any, seed: int, device: Any = None) -> Inputs:
    """attention.random_inputs on a JAX device (attention.random_on, one compiled program): the same
    bits, mask included; scale 1/sqrt(d) given explicitly."""
    from .backends.jax import JaxBackend

    inp = random_on(JaxBackend(device), shape, var, np.dtype(dtype).name, seed)
    return replace(inp, scale=1.0 / math.sqrt(shape.d))


def exact_inputs(shape: Shape, var: Variant, dtype: Any, seed: int, device: Any = None) -> Inputs:
    """attention.exact_inputs on a JAX device (attention.exact_on, one compiled program): q, k, v, dO
    bit-identical to the torch path's; the expected outputs come to the host once (the checks run there)."""
    from .backends.jax import JaxBackend

    inp = exact_on(JaxBackend(device), shape, var, np.dtype(dtype).name, seed)
    return replace(inp, expected={name: jb.to_host(x) for name, x in inp.expected.items()})


# ---- the formula and its float64 reference ------------------------------------------------


def _formula(q: Any, k: Any, v: Any, causal: bool, xp: Any, scale: float | None = None, mask: Any = None,
             precision: Any = None) -> Any:
    """softmax(q k^T scale + mask) v with k, v repeated over each KV head's query group."""
    group = q.shape[1] // k.shape[1]
    k = xp.repeat(k, group, axis=1)
    v = xp.repeat(v, group, axis=1)
    kw = {} if precision is None else {"precision": precision}
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = xp.einsum("bhqd,bhkd->bhqk", q, k, **kw) * scale
    if mask is not None:
        s = s + mask
    if causal:
        n = q.shape[2]
        s = xp.where(xp.tril(xp.ones((n, n), dtype=bool)), s, -xp.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p = p / p.sum(axis=-1, keepdims=True)
    return xp.einsum("bhqk,bhkd->bhqd", p, v, **kw)


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray, causal: bool,
               scale: float | None = None, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Float64 out, dq, dk, dv of the formula, by hand (the adjoint of softmax attention)."""
    b, hq, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // k.shape[1]
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, kr) * scale
    if mask is not None:
        s = s + mask
    if causal:
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", p, vr)
    dp = np.einsum("bhqd,bhkd->bhqk", do, vr)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = np.einsum("bhqk,bhkd->bhqd", ds, kr) * scale
    dkr = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    dvr = np.einsum("bhqk,bhqd->bhkd", p, do)
    fold = (b, k.shape[1], group, n, d)  # gradients of repeated KV heads add up
    return {"out": out, "dq": dq, "dk": dkr.reshape(fold).sum(axis=2), "dv": dvr.reshape(fold).sum(axis=2)}


def _mag(ref: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.sqrt(np.mean(v * v))) + 1e-30 for k, v in ref.items()}


def _compare(ref: np.ndarray, act: np.ndarray, tol: np.ndarray, tensor: str, oracle: Oracle,
             note: str = "") -> Mismatch | None:
    """Elements outside the tolerance, diagnosed as the torch probe's `tolerance_mismatch`:
    (batch, head, row, col) indices, expected (rounded to the output dtype) vs actual bits, and
    the histogram of flipped bit positions over the bad elements. NaN is always outside."""
    act64 = act.astype(np.float64)
    err = np.abs(act64 - ref)
    bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    flat = np.flatnonzero(bad)[:4096]
    width = act.dtype.itemsize * 8
    e_bits = npo.int_view(np.ascontiguousarray(ref.reshape(-1)[flat].astype(act.dtype))).astype(np.int64)
    a_bits = npo.int_view(np.ascontiguousarray(act.reshape(-1)[flat])).astype(np.int64)
    xor = e_bits ^ a_bits
    hist = {b: int(((xor >> b) & 1).sum()) for b in range(width)}
    listed = flat[:8]
    where = [[int(x) for x in np.unravel_index(int(i), act.shape)] for i in listed]
    rows = sorted({tuple(int(x) for x in np.unravel_index(int(i), act.shape)[:3]) for i in flat})
    finite = err[np.isfinite(err)]
    mask = (1 << width) - 1
    return Mismatch(oracle=oracle, tensor=tensor, bad_elements=n_bad, total_elements=int(bad.size),
                    first_indices=where, expected=[float(ref.reshape(-1)[i]) for i in listed],
                    actual=[float(act64.reshape(-1)[i]) for i in listed],
                    expected_bits=[format(int(x) & mask, f"0{width}b") for x in e_bits[:8]],
                    actual_bits=[format(int(x) & mask, f"0{width}b") for x in a_bits[:8]],
                    bit_histogram={b: c for b, c in hist.items() if c},
                    max_abs_error=float(finite.max()) if finite.size else math.inf,
                    note=(f"{note} bad_rows={len(rows)} rows(b,h,i)={[list(r) for r in rows[:8]]} "
                          f"tol_max={float(np.max(tol)):.3g}").strip())


def _canon(a: np.ndarray) -> np.ndarray:
    """-0 -> +0 (a copy): the exact oracle's expected zeros have no sign (0 * negative is -0 in IEEE)."""
    a = np.array(a, copy=True)
    a[a == 0] = 0
    return a


def exact_mismatches(expected: dict[str, np.ndarray], hosts: dict[str, np.ndarray],
                     note: str = "") -> list[Mismatch]:
    """The exact oracle: every bit of every tensor in `hosts` against `expected`, signed zeros folded."""
    found = []
    for name, act in hosts.items():
        m = npo.compare_bits(_canon(expected[name]), _canon(act), tensor=name, oracle=Oracle.EXACT)
        if m is not None:
            found.append(m if not note else _with_note(m, note))
    return found


def _with_note(m: Mismatch, note: str) -> Mismatch:
    return replace(m, note=f"{note} {m.note}".strip())


# ---- one case ----------------------------------------------------------------------------


def _parse(case: str, cfg: Config) -> tuple[str, Variant]:
    dtype_name, _, variant = case.partition("/")
    if dtype_name not in DTYPES or variant not in VARIANTS:
        raise InvalidConfig(f"unknown attention case {case!r}; e.g. bfloat16/causal "
                            f"(dtypes {', '.join(DTYPES)}; variants {', '.join(VARIANTS)})")
    if cfg.kv_heads < 1 or cfg.q_heads % cfg.kv_heads:
        raise InvalidConfig(f"attention: q_heads={cfg.q_heads} must be a multiple of kv_heads={cfg.kv_heads}")
    return dtype_name, VARIANTS[variant]


def run_case(device: Any, cfg: Config, case: str, seed: int, inj: jb.Injector) -> CaseOutcome:
    """One attention case on one JAX device; `seed` is the run's base seed (the case stream is mixed in here)."""
    import jax
    import jax.numpy as jnp

    dtype_name, var = _parse(case, cfg)
    shape = Shape(b=cfg.batch, hq=cfg.q_heads, hkv=cfg.kv_heads if var.gqa else cfg.q_heads, s=cfg.seq,
                  d=cfg.head_dim)
    seed = seed ^ g.stream_id("attention/" + case)
    dt = getattr(jnp, dtype_name)
    inp = (exact_inputs if var.exact else random_inputs)(shape, var, dt, seed, device)
    q, k, v, do = (jax.device_put(x, device) for x in (inp.q, inp.k, inp.v, inp.dout))
    mask = None if inp.mask is None else jax.device_put(inp.mask, device)
    hi = jax.lax.Precision.HIGHEST

    def fwd_bwd(q: Any, k: Any, v: Any, do: Any, mask: Any) -> Any:
        def f(q: Any, k: Any, v: Any) -> Any:
            m = None if mask is None else mask.astype(jnp.float32)
            return _formula(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), var.causal,
                            jnp, inp.scale, m, hi).astype(q.dtype)

        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    kernel = jax.jit(fwd_bwd)
    out = CaseOutcome(case=case, params={"batch": shape.b, "q_heads": shape.hq, "kv_heads": shape.hkv,
                                         "seq": shape.s, "head_dim": shape.d, "dtype": dtype_name,
                                         "causal": var.causal, "mask": var.mask,
                                         "mode": "exact" if var.exact else "random", "scale": inp.scale,
                                         "precision": "HIGHEST", "backend": "jax", "jax_device": str(device)})
    ref = None if var.exact else _HostReference(inp, var, cfg, dtype_name)
    jb.timed(lambda: kernel(q, k, v, do, mask))  # compile + warm-up, outside the faults

    def call() -> tuple[dict[str, Any], float, float | None]:
        res, dt_s = inj.call(OP, lambda: kernel(q, k, v, do, mask))
        hosts = [jb.to_host(x) for x in res]
        for i, h in enumerate(hosts):  # out, dq, dk, dv: a fault's `output=` picks one (default out)
            inj.corrupt(h, output=i)
        return dict(zip(TENSORS, hosts, strict=True)), dt_s, None  # one program: not timed per pass

    # the case flow written once (attention.run_flow), on the host copies the faults corrupted
    rounds = max(cfg.repeats, 2)
    run_flow(NumpyBackend(), [AttentionKernel("formula", call)], inp, shape, var, out, ref=ref, keep=_keep,
             repeats=rounds, max_repeats=rounds)
    _cross_backend(out, inp, var, q, k, v, mask, None if ref is None else (ref.ref["out"], ref.tols["out"]))
    return out


KEEP = KeepPolicy(by_tensor=True, stamp=Stamp.REPEAT, stamp_oracles=frozenset({Oracle.EXACT, Oracle.REFERENCE}))
"""The first mismatch per (oracle, tensor); the exact and reference oracles name their round."""


def _keep(out: CaseOutcome, m: Mismatch, kernel: str | None, r: int) -> None:
    """attention.Keep: one kernel here (`formula`), so its name is no part of the identity."""
    keep(out, m, KEEP, repeat=r)


class _HostReference:
    """The reference oracle on the host: float64 of the values the kernel was given, under
    `sigmas * u * sqrt(seq) * (|ref| + rms(ref))` (attention.CaseReference)."""

    def __init__(self, inp: Inputs, var: Variant, cfg: Config, dtype_name: str):
        host_in = [jb.to_host(x).astype(np.float64) for x in (inp.q, inp.k, inp.v, inp.dout)]
        mask = None if inp.mask is None else jb.to_host(inp.mask).astype(np.float64)
        self.ref = _reference(*host_in, causal=var.causal, scale=inp.scale, mask=mask)
        mag = _mag(self.ref)
        u = _U[dtype_name]
        self.tols = {t: cfg.sigmas * u * math.sqrt(cfg.seq) * (np.abs(r) + mag[t]) for t, r in self.ref.items()}

    def check(self, name: str, act: np.ndarray) -> Mismatch | None:
        return _compare(self.ref[name], act, self.tols[name], name, Oracle.REFERENCE)

    # one deterministic kernel here (the formula): the flow never asks for a spread or a cross-kernel check;
    # jax.nn.dot_product_attention is a forward-only second opinion outside the faults (_cross_backend)
    def spread(self, name: str, first: Any, act: Any) -> float:
        raise NotImplementedError("the JAX path has no nondeterministic kernel")

    def cross(self, name: str, anchor: Any, other: Any, note: str) -> Mismatch | None:
        raise NotImplementedError("the JAX path runs one kernel in the flow")


def _cross_backend(out: CaseOutcome, inp: Inputs, var: Variant, q: Any, k: Any, v: Any, mask: Any,
                   ref_out: tuple[np.ndarray, np.ndarray] | None) -> None:
    """jax.nn.dot_product_attention on the same inputs, where this JAX has it: the expected bits in
    exact mode (`ref_out` None), else within the tolerance of the float64 reference `ref_out`."""
    import jax

    dpa = getattr(jax.nn, "dot_product_attention", None)
    if dpa is None:
        out.params["cross_backend"] = "absent"
        return
    def second(q: Any, k: Any, v: Any, mask: Any) -> Any:
        # jax.nn takes (batch, seq, heads, dim), groups KV heads itself and adds `bias` to the logits
        t = (0, 2, 1, 3)
        bias = None if mask is None else mask[None, None]
        return dpa(q.transpose(t), k.transpose(t), v.transpose(t), bias=bias, scale=inp.scale,
                   is_causal=var.causal).transpose(t)

    try:
        with jax.default_matmul_precision("highest"):  # as the formula's einsums (TPU: no bf16 passes)
            host = jb.to_host(jax.jit(second)(q, k, v, mask))
    except Exception as e:  # an implementation this backend cannot run: say so, do not fail the chip
        out.params["cross_backend"] = f"unavailable: {type(e).__name__}"
        return
    name = "jax.nn.dot_product_attention"
    out.params["cross_backend"] = name
    if ref_out is None:
        found = exact_mismatches(inp.expected, {"out": host}, note=f"backend={name}")
    else:
        m = _compare(ref_out[0], host, ref_out[1], "out", Oracle.CROSS_BACKEND, note=name)
        found = [m] if m is not None else []
    if found:
        out.mismatches.extend(found)
        out.repeats_bad = out.repeats
