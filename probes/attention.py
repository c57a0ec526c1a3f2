"""Attention probe: `scaled_dot_product_attention` forward and backward, checked like the matmul.

Catches: silent corruption in the fused attention kernels (flash, memory-efficient, cuDNN, the
CPU flash kernel) and in the GEMMs / softmax of the math path, in the output and in the three
gradients; nondeterministic chips; throttled chips (TFLOP/s, judged by the fleet).

One case per (dtype, head dim, variant); inside a case every SDPA backend the device offers is
selected explicitly (`torch.nn.attention.sdpa_kernel`) and run on the same inputs, in rounds
(one call of each backend per round, forward then backward, each timed). `params["backends"]`
records which ran, `params["skipped"]` which could not and why (e.g. flash takes no mask).

Variants: `exact` (causal, grouped-query), `full` (non-causal, one KV head per Q head), `causal`
(grouped-query), `mask` (additive float mask with -inf padding, grouped-query).

Oracles:
- `exact`: one-hot attention. Q/K encode key codes in base-4 digits so that the raw score is
  C - ||digits(t) - digits(j)||^2: exactly C (a power of two) at the target key t(i) <= i and at
  least 1 lower elsewhere; with scale 256 every other probability underflows to exactly 0 and the
  target's is exp(0) = 1. So out = V[t(i)], dq = dk = 0 and dv = sums of small-integer dO rows,
  all exact in fp32/bf16/fp16 whatever the summation order: any differing bit is an error
  (signed zeros are folded: -0 == +0). Assumes the kernel's exp(0) is exactly 1.
- random cases (full-mantissa uniform inputs): an fp64 reference of the formula
  (softmax(QK^T s + mask) V and its gradients) on sampled (batch, KV-head) groups under the
  dtype-aware tolerance `sigmas * u_eff * (|ref| + mag)`, where mag is the formula evaluated with
  every term made positive (P|V|, P(|dP| + sum|dO||O|)|K|, ...: componentwise error analysis, so
  rows with few keys and the cancellation in dS and in D = rowsum(dO O) are covered) and u_eff = sqrt(u^2 (1 + s/256) + (s + d) 2^-48)
  (u: the dtype's unit roundoff; s/256: per-block roundings; (s + d) 2^-48: fp32 accumulation);
  agreement between backends on every element (twice that tolerance); non-finite values;
  repeat-determinism (bitwise) for backends that promise it, and for backends documented
  nondeterministic (CUDA flash / efficient backward use atomics) the repeat spread measured
  against the tolerance, flagged only beyond it; a hash of the deterministic outputs for fleet
  consensus (CaseOutcome.output_hash).

Speed: the standard attention count, 4 b h s^2 d forward, 2.5x that backward, halved when causal;
`tflops` (median fwd+bwd call) and `tflops_best` (best call) of the first backend that ran.
Cost: the reference is O(G g s^2 d) in fp64 for G sampled groups; the other checks are O(b h s d).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .. import generator as g
from ..results import Mismatch, Oracle
from . import oracles
from .backends import oracles as bo
from .backends.base import Backend
from .backends.torch import TorchBackend
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, Unsupported, profile_table, register

DTYPES = ("float32", "bfloat16", "float16")
TENSORS = ("out", "dq", "dk", "dv")
BACKENDS = ("flash", "cudnn", "efficient", "math")
# What each device kind offers, in order: the first backend that runs is the timed one.
OFFERED = {"cpu": ("flash", "math"), "cuda": ("flash", "cudnn", "efficient", "math")}
# Backends whose backward is documented nondeterministic (atomic adds into dq / dk / dv):
# repeats may differ in the last bits there, so the spread is measured instead of bits compared.
NONDETERMINISTIC_BACKWARD = {("cuda", "flash"), ("cuda", "efficient")}
EXACT_SCALE = 256.0  # a power of two: q, k and sqrt(scale) stay exact in every dtype
EXACT_WINDOW = 8  # exact mode: each query targets one of the 8 keys at or before it


@dataclass(frozen=True, slots=True)
class Variant:
    causal: bool
    mask: bool
    gqa: bool
    exact: bool = False


VARIANTS = {
    "exact": Variant(causal=True, mask=False, gqa=True, exact=True),
    "full": Variant(causal=False, mask=False, gqa=False),
    "causal": Variant(causal=True, mask=False, gqa=True),
    "mask": Variant(causal=False, mask=True, gqa=True),
}


@register("attention")
class AttentionProbe(Probe):
    order = 20

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        head_dims: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"float32": (64,)})
        """Head dims per dtype (the dtypes run are its keys)."""
        seq: dict[str, int] = field(default_factory=lambda: {"float32": 64})
        """Sequence length (queries = keys) per dtype."""
        batch: int = 1
        """Batch size."""
        q_heads: int = 4
        """Query heads."""
        kv_heads: int = 2
        """Key/value heads of the grouped-query variants (divides q_heads)."""
        variants: tuple[str, ...] = tuple(VARIANTS)
        """Variants run per (dtype, head dim)."""
        backends: tuple[str, ...] = ()
        """Backends tried, in order (empty: every backend the device kind offers)."""
        repeats: int = 2
        """Minimum rounds per case (repeat-determinism needs two or more)."""
        max_repeats: int = 2
        """Upper bound on rounds per case when a time budget is set."""
        budget_s: float = 0.0
        """Seconds a case may keep repeating after `repeats` (0: exactly `repeats`)."""
        ref_groups: int = 0
        """(batch, KV-head) groups recomputed in fp64 by the reference oracle (0: all)."""
        sigmas: float = 8.0
        """Width of the tolerance, in units of u_eff * (|ref| + magnitude) (measured worst: 1.4)."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("attention", profile, device_kind)
        kind = "cuda" if device_kind in ("cuda", "rocm") else "cpu"
        cfg = self.Config(
            head_dims={d: tuple(int(x) for x in v) for d, v in p["head_dims"].items()},
            seq={d: int(v) for d, v in p["seq"].items()},
            batch=int(p["batch"]), q_heads=int(p["q_heads"]), kv_heads=int(p["kv_heads"]),
            variants=tuple(p.get("variants", tuple(VARIANTS))),
            backends=tuple(p.get("backends", OFFERED[kind])),
            repeats=int(p["repeats"]), max_repeats=int(p["max_repeats"]), budget_s=float(p["budget_s"]),
            ref_groups=int(p.get("ref_groups", 0)), sigmas=float(p.get("sigmas", 8.0)))
        validate(cfg)
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return [f"{dt}/d{d}/{v}" for dt, dims in cfg.head_dims.items() for d in dims for v in cfg.variants]

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        dtype_name, d, variant = _parse_case(cfg, case)
        var = VARIANTS[variant]
        kv = cfg.kv_heads if var.gqa else cfg.q_heads
        shape = Shape(b=cfg.batch, hq=cfg.q_heads, hkv=kv, s=cfg.seq[dtype_name], d=d)
        seed = ctx.seed ^ g.stream_id(case)
        dtype = _dtype(dtype_name)
        inp = (exact_inputs if var.exact else random_inputs)(shape, var, dtype, seed, ctx.device)
        return _run(ctx, cfg, case, shape, var, inp)


def validate(cfg: AttentionProbe.Config) -> None:
    """Fail early, with a fix-it message, on a config the probe cannot run."""
    for dt, dims in cfg.head_dims.items():
        if dt not in DTYPES:
            raise InvalidConfig(f"attention: unknown dtype {dt!r}; known: {', '.join(DTYPES)}")
        if dt not in cfg.seq or cfg.seq[dt] < 2:
            raise InvalidConfig(f"attention: give seq.{dt} >= 2 in probes/profiles/attention.toml")
        for d in dims:
            if d < 16 or d % 8:
                raise InvalidConfig(f"attention: head dim {d} for {dt} must be a multiple of 8 >= 16")
    for v in cfg.variants:
        if v not in VARIANTS:
            raise InvalidConfig(f"attention: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    for b in cfg.backends:
        if b not in BACKENDS:
            raise InvalidConfig(f"attention: unknown backend {b!r}; known: {', '.join(BACKENDS)}")
    if cfg.kv_heads < 1 or cfg.q_heads % cfg.kv_heads:
        raise InvalidConfig(f"attention: kv_heads={cfg.kv_heads} must divide q_heads={cfg.q_heads}")
    if cfg.repeats < 2 or cfg.max_repeats < cfg.repeats:
        raise InvalidConfig("attention: need 2 <= repeats <= max_repeats (repeat-determinism compares rounds)")


def _parse_case(cfg: AttentionProbe.Config, case: str) -> tuple[str, int, str]:
    parts = case.split("/")
    if len(parts) == 3 and parts[0] in cfg.head_dims and parts[1].startswith("d") and parts[1][1:].isdigit():
        d = int(parts[1][1:])
        if d in cfg.head_dims[parts[0]] and parts[2] in VARIANTS:
            return parts[0], d, parts[2]
    raise InvalidConfig(f"unknown attention case {case!r}; e.g. bfloat16/d128/causal")


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


@dataclass(frozen=True, slots=True)
class Shape:
    b: int
    hq: int
    hkv: int
    s: int
    d: int

    @property
    def group(self) -> int:
        return self.hq // self.hkv


@dataclass(slots=True)
class Inputs:
    """What every backend is given, and (exact mode) what it must return bit for bit."""

    q: Any
    k: Any
    v: Any
    dout: Any
    mask: Any = None
    scale: float | None = None
    expected: dict[str, Any] = field(default_factory=dict)


# ---- inputs: written once against the backend layer (probes/backends/) --------------------
#
# `random_on` / `exact_on` build a case's arrays on any Backend with identical bits (torch here,
# JAX in jax_attention, numpy as the reference). Their pure part is one traceable builder per
# mode (static: shape, dtype; arguments: the stream keys), which a JAX backend compiles once.

_RANDOM_STREAMS = ("attention/q", "attention/k", "attention/v", "attention/dout", "attention/mask", "attention/pad")
_EXACT_STREAMS = ("attention/exact/xor", "attention/exact/target", "attention/exact/qspare", "attention/exact/v",
                  "attention/exact/dout")


def random_inputs(shape: Shape, var: Variant, dtype: Any, seed: int, device: Any) -> Inputs:
    """Full-mantissa uniform Q, K, V, dO in [-1, 1); the mask: uniform [-2, 2) plus -inf padding."""
    return random_on(TorchBackend(device), shape, var, str(dtype).removeprefix("torch."), seed)


def exact_inputs(shape: Shape, var: Variant, dtype: Any, seed: int, device: Any) -> Inputs:
    """One-hot attention whose out, dq, dk, dv are known exactly (see the module docstring and `exact_on`)."""
    return exact_on(TorchBackend(device), shape, var, str(dtype).removeprefix("torch."), seed)


def random_on(bk: Backend, shape: Shape, var: Variant, dtype: str, seed: int) -> Inputs:
    """random_inputs on backend `bk` (scale None: the kernel's default 1/sqrt(d))."""
    keys = bk.index([g.key(seed, st) for st in _RANDOM_STREAMS])
    q, k, v, dout, mask = bk.compile(_random_arrays, "shape", "dtype", "mask")(keys, shape=shape, dtype=dtype,
                                                                              mask=var.mask)
    return Inputs(q=q, k=k, v=v, dout=dout, mask=mask)


def exact_on(bk: Backend, shape: Shape, var: Variant, dtype: str, seed: int) -> Inputs:
    """exact_inputs on backend `bk`: inputs and expected outputs on its device.

    Key j of (batch, KV head) carries code c_j = j ^ x (x seeded, so codes are distinct) as
    base-4 digits D(c_j) and their squares, plus a constant 1; the query of row i, head h,
    targeting key t carries 2 D(c_t), -1 per digit and C - |D(c_t)|^2, so q.k_j = C - |D(c_t) - D(c_j)|^2.
    Spare dims: small integers in Q, zeros in K (their products vanish exactly).
    """
    s, d = shape.s, shape.d
    nbits = max(2, (s - 1).bit_length() + ((s - 1).bit_length() & 1))
    nd = nbits // 2
    if 2 * nd + 1 > d:
        raise InvalidConfig(f"attention exact: head dim {d} too small for seq {s} (needs {2 * nd + 1})")
    if var.causal is False:
        raise InvalidConfig("attention exact: the exact variant is causal")
    keys = bk.index([g.key(seed, st) for st in _EXACT_STREAMS])
    q, k, v, dout, *exp = bk.compile(_exact_arrays, "shape", "dtype", "nbits")(keys, shape=shape, dtype=dtype,
                                                                              nbits=nbits)
    return Inputs(q=q, k=k, v=v, dout=dout, scale=EXACT_SCALE, expected=dict(zip(TENSORS, exp, strict=True)))


def _uniform(bk: Backend, key: Any, shape: tuple[int, ...]) -> Any:
    """generator.uniform under a stream key: float32 in [-1, 1), 24 random bits."""
    return bk.cast(bk.hashed(key, shape) >> 8, "float32") * 2.0**-23 - 1.0


def _small_ints(bk: Backend, key: Any, shape: tuple[int, ...], radius: int) -> Any:
    """generator.small_ints under a stream key: integers in [-radius, radius], float32."""
    return bk.cast(bk.hashed(key, shape) % (2 * radius + 1) - radius, "float32")


def _random_arrays(bk: Backend, keys: Any, *, shape: Shape, dtype: str, mask: bool) -> tuple[Any, ...]:
    """q, k, v, dO and the mask (None without one) of random_inputs, in `dtype`."""
    qs, kvs = (shape.b, shape.hq, shape.s, shape.d), (shape.b, shape.hkv, shape.s, shape.d)
    q, k, v, dout = (bk.cast(_uniform(bk, keys[i], sh), dtype) for i, sh in enumerate((qs, kvs, kvs, qs)))
    if not mask:
        return q, k, v, dout, None
    s = shape.s
    m = 2.0 * _uniform(bk, keys[4], (s, s))
    # -inf on one key in eight (never the diagonal: no fully masked row), like padding
    idx = bk.arange(s)
    keep = (_small_ints(bk, keys[5], (s, s), 4) != 4) | (idx[:, None] == idx[None, :])
    return q, k, v, dout, bk.cast(bk.where(keep, m, float("-inf")), dtype)


def _digits(bk: Backend, x: Any, n: int) -> Any:
    """Base-4 digits of integer array x, least significant first, as a new last axis of size n (float32)."""
    return bk.cast(bk.concat([((x >> (2 * m)) & 3)[..., None] for m in range(n)], axis=-1), "float32")


def _exact_arrays(bk: Backend, keys: Any, *, shape: Shape, dtype: str, nbits: int) -> tuple[Any, ...]:
    """q, k, v, dO and the expected out, dq, dk, dv of exact_inputs, in `dtype`."""
    b, hq, hkv, s, d = shape.b, shape.hq, shape.hkv, shape.s, shape.d
    group, nd, f32 = hq // hkv, nbits // 2, "float32"
    c = 1 << (9 * nd).bit_length()  # a power of two above every |D|^2 (digits <= 3)
    idx = bk.arange(s)
    xk = bk.hashed(keys[0], (b * hkv,)) % (1 << nbits)
    codes = idx[None, :] ^ xk[:, None]  # (b*hkv, s): distinct per KV head
    dk_ = _digits(bk, codes, nd)  # (b*hkv, s, nd)
    # key j: digits, their squares, a constant 1; spare dims zero (their products vanish exactly)
    k = bk.concat([dk_, dk_ * dk_, bk.zeros((b * hkv, s, 1), f32) + 1.0, bk.zeros((b * hkv, s, d - 2 * nd - 1), f32)],
                  axis=-1).reshape(b, hkv, s, d)
    # target of (b, h, i): one of the EXACT_WINDOW keys at or before i
    back = bk.hashed(keys[1], (b, hq, s)) % bk.where(idx < EXACT_WINDOW, idx + 1, EXACT_WINDOW)
    target = idx - back  # (b, hq, s)
    rows = bk.arange(b)[:, None] * hkv + bk.arange(hq)[None, :] // group  # (b, hq) -> row of codes
    dq_ = _digits(bk, codes[rows[:, :, None], target], nd)  # (b, hq, s, nd)
    # query: 2 D(c_t), -1 per digit, C - |D(c_t)|^2, so q.k_j = C - |D(c_t) - D(c_j)|^2; spare dims small ints
    spare = _small_ints(bk, keys[2], (b, hq, s, d), 2)
    q = bk.concat([2.0 * dq_, bk.zeros((b, hq, s, nd), f32) - 1.0, (c - bk.sum(dq_ * dq_, -1))[..., None],
                   spare[..., 2 * nd + 1:]], axis=-1)
    # V on a 1/8 grid, dO small integers: every product and sum in the backward is exact
    v = _small_ints(bk, keys[3], (b, hkv, s, d), 8) / 8.0
    dout = _small_ints(bk, keys[4], (b, hq, s, d), 2)
    # expected: out = V[t(i)] of the query's KV head; dq = dk = 0; dv[j] = the sum of the dO rows
    # whose target is j, over the KV group: row j + w targets j when back = w (w < EXACT_WINDOW; rows
    # past the end padded with back = 0, which no w >= 1 matches). Sums of small integers: exact in float32 in any
    # order, so the same bits as a scatter-add.
    out = v[bk.arange(b)[:, None, None], (bk.arange(hq) // group)[None, :, None], target]
    w_max = EXACT_WINDOW - 1
    back_p = bk.concat([back, bk.zeros((b, hq, w_max), "int64")], axis=2)
    dout_p = bk.concat([dout, bk.zeros((b, hq, w_max, d), f32)], axis=2)
    dv = bk.where((back == 0)[..., None], dout, 0.0)
    for w in range(1, EXACT_WINDOW):
        dv = dv + bk.where((back_p[:, :, w:w + s] == w)[..., None], dout_p[:, :, w:w + s], 0.0)
    dv = bk.sum(dv.reshape(b, hkv, group, s, d), 2)
    return (bk.cast(q, dtype), bk.cast(k, dtype), bk.cast(v, dtype), bk.cast(dout, dtype), bk.cast(out, dtype),
            bk.zeros((b, hq, s, d), dtype), bk.zeros((b, hkv, s, d), dtype), bk.cast(dv, dtype))


# ---- the call under test -----------------------------------------------------------------


def _sdpa_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


class _NoKernel(Exception):
    """This backend cannot run this case (dtype, mask, GQA, head dim): recorded, not an error."""


def call(backend: str, inp: Inputs, var: Variant, shape: Shape, timer: Any = None) -> tuple[dict[str, Any], float, float]:
    """One forward + backward through `backend` only: ({out, dq, dk, dv}, fwd seconds, bwd seconds)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q, k, v = (t.detach().requires_grad_(True) for t in (inp.q, inp.k, inp.v))

    def fwd() -> Any:
        with sdpa_kernel([_sdpa_backend(backend)]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=inp.mask, is_causal=var.causal,
                                                  scale=inp.scale, enable_gqa=shape.hkv != shape.hq)

    def bwd() -> Any:
        return torch.autograd.grad(out, (q, k, v), inp.dout)

    if timer is None:
        out = fwd()
        grads = bwd()
        return {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}, 0.0, 0.0
    out, t_f = timer.time(fwd)
    grads, t_b = timer.time(bwd)
    return {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}, t_f, t_b


def _first_call(kernel: Callable[[], tuple[dict[str, Any], float, float | None]]) -> dict[str, Any]:
    """First call of a backend (library heuristics, caches), under its faults; its outputs are
    checked as round 0 of the flow, never timed. Raises _NoKernel when the backend cannot run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return kernel()[0]
        except RuntimeError as e:
            if "No viable backend" in str(e) or "No available kernel" in str(e):
                why = [str(w.message).splitlines()[0] for w in caught if "sdp" in str(w.message).lower()
                       or "attention" in str(w.message).lower()]
                raise _NoKernel("; ".join(why[:3]) or str(e).splitlines()[0]) from None
            raise


# ---- the fp64 reference ------------------------------------------------------------------


@dataclass(slots=True)
class Reference:
    """fp64 out/dq/dk/dv on sampled (batch, KV head) groups, their scales, and how to gather actuals."""

    groups: list[tuple[int, int]]
    ref: dict[str, Any]
    rms: dict[str, float]
    """rms of each reference tensor (a scalar)."""
    mag: dict[str, Any]
    """Componentwise magnitude of each output (the formula with every term made positive), the
    scale of its rounding error: causal rows and the cancellation in dS = P (dP - D) differ a lot."""
    u_eff: float
    tiny: float = 0.0
    """Spacing of the dtype's subnormals (fp16: 2^-24): the absolute floor of any rounding."""

    def tolerance(self, name: str, sigmas: float) -> Any:
        """Per-element tolerance of output `name`: sigmas * u_eff * (|ref| + magnitude) + subnormal spacing."""
        return sigmas * self.u_eff * (self.ref[name].abs() + self.mag[name]) + self.tiny

    def row_envelope(self, name: str) -> Any:
        """Largest magnitude per row index over the sampled groups, (1, 1, s, 1): the error scale of
        every (batch, head) at that row, for checks that cover groups the reference did not."""
        m = self.mag[name].amax(dim=(0, 1, 3))
        return m.view(1, 1, -1, 1)

    def gather(self, name: str, t: Any, g_size: int) -> Any:
        """The sampled slices of output `name`: (G, g, s, d) for out/dq, (G, 1, s, d) for dk/dv."""
        import torch

        if name in ("out", "dq"):
            return torch.stack([t[b, h * g_size:(h + 1) * g_size] for b, h in self.groups])
        return torch.stack([t[b, h:h + 1] for b, h in self.groups])

    def index(self, name: str, idx: list[int], g_size: int) -> list[int]:
        """(group, head-in-group, row, col) of the gathered tensor -> (batch, head, row, col)."""
        gi, hh, row, col = idx
        b, h = self.groups[gi]
        return [b, h * g_size + hh if name in ("out", "dq") else h, row, col]


def reference(inp: Inputs, var: Variant, shape: Shape, n_groups: int, seed: int) -> Reference:
    """softmax(Q K^T scale + mask) V and its gradients in float64, on `n_groups` groups (0: all)."""
    import torch

    all_groups = [(b, h) for b in range(shape.b) for h in range(shape.hkv)]
    if n_groups and n_groups < len(all_groups):
        step = len(all_groups) / n_groups
        off = g.key(seed, "attention/groups") % len(all_groups)
        groups = sorted({all_groups[(off + int(i * step)) % len(all_groups)] for i in range(n_groups)})
    else:
        groups = all_groups
    gs = shape.group
    sel = Reference(groups=groups, ref={}, rms={}, mag={}, u_eff=0.0)
    q = sel.gather("out", inp.q, gs).double()  # (G, g, s, d)
    k = sel.gather("dk", inp.k, gs).double()  # (G, 1, s, d)
    v = sel.gather("dv", inp.v, gs).double()
    do = sel.gather("out", inp.dout, gs).double()
    scale = inp.scale if inp.scale is not None else 1.0 / math.sqrt(shape.d)
    s = (q @ k.transpose(-1, -2)) * scale
    if inp.mask is not None:
        s = s + inp.mask.double()
    if var.causal:
        s = s.masked_fill(~torch.ones(shape.s, shape.s, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    p = torch.softmax(s, dim=-1)
    del s
    out = p @ v
    dp = do @ v.transpose(-1, -2)
    dd = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - dd)
    # Kernels form D = rowsum(dO * O) from the output they rounded: its error scales with
    # sum |dO| |O|, not with |D| (which cancels: a query row with few keys had dq off by its sign).
    dd_mag = (do.abs() * (p @ v.abs())).sum(-1, keepdim=True)
    ds_mag = p * (dp.abs() + dd_mag)
    del dp
    sel.ref = {"out": out, "dq": (ds @ k) * scale,
               "dk": ((ds.transpose(-1, -2) @ q) * scale).sum(1, keepdim=True),
               "dv": (p.transpose(-1, -2) @ do).sum(1, keepdim=True)}
    sel.mag = {"out": p @ v.abs(), "dq": (ds_mag @ k.abs()) * scale,
               "dk": ((ds_mag.transpose(-1, -2) @ q.abs()) * scale).sum(1, keepdim=True),
               "dv": (p.transpose(-1, -2) @ do.abs()).sum(1, keepdim=True)}
    sel.rms = {n: float(t.pow(2).mean().sqrt()) for n, t in sel.ref.items()}
    sel.u_eff = u_eff(inp.q.dtype, shape.s, shape.d)
    fi = torch.finfo(inp.q.dtype)
    sel.tiny = float(fi.tiny) * float(fi.eps)
    return sel


def u_eff(dtype: Any, s: int, d: int) -> float:
    """Relative error scale of SDPA outputs in `dtype`: sqrt(u^2 (1 + s/256) + (s + d) 2^-48).

    u: the dtype's unit roundoff (output rounding; half-precision kernels also round P and dS
    before their GEMMs). s/256: kernels that carry dk/dv (or the output) across key/query blocks
    in the output dtype add one rounding per block (measured on the CPU flash kernel: the error
    of dk/dv grows like sqrt(s)). (s + d) 2^-48: fp32 accumulation over s keys and d dims.
    """
    u = oracles.unit_roundoff(dtype)
    return math.sqrt(u * u * (1.0 + s / 256.0) + (s + d) * 2.0**-48)


def _row_rms(t: Any) -> Any:
    return t.double().pow(2).mean(-1, keepdim=True).sqrt()


def tolerance_mismatch(expected: Any, actual: Any, tol: Any, *, tensor: str, oracle: Oracle,
                       to_index: Any, note: str = "") -> Mismatch | None:
    """Elements with |actual - expected| > tol (NaN counts), diagnosed like `oracles.compare_bits`:
    indices (batch, head, row, col), expected (rounded to the output dtype) vs actual bits, and the
    histogram of flipped bit positions over the bad elements."""
    import torch

    err = (actual.double() - expected).abs()
    bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    flat = torch.nonzero(bad.reshape(-1)).reshape(-1)[:4096]
    width = actual.element_size() * 8
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    e_bits = expected.to(actual.dtype).reshape(-1)[flat].contiguous().view(ints).to(torch.int64).cpu()
    a_bits = actual.reshape(-1)[flat].contiguous().view(ints).to(torch.int64).cpu()
    xor = e_bits ^ a_bits
    hist = {b: int(((xor >> b) & 1).sum()) for b in range(width)}
    shape = list(actual.shape)
    listed = flat[:oracles.MAX_LISTED].cpu().tolist()
    indices = [to_index(list(oracles.unravel(i, shape))) for i in listed]
    rows = sorted({tuple(to_index(list(oracles.unravel(int(i), shape)))[:3]) for i in flat})
    finite = err[torch.isfinite(err)]
    return Mismatch(
        oracle=oracle, tensor=tensor, bad_elements=n_bad, total_elements=actual.numel(),
        first_indices=indices,
        expected=[float(x) for x in expected.reshape(-1)[flat[:oracles.MAX_LISTED]].cpu()],
        actual=[float(x) for x in actual.reshape(-1)[flat[:oracles.MAX_LISTED]].double().cpu()],
        expected_bits=[oracles.bits_str(int(x), width) for x in e_bits[:oracles.MAX_LISTED]],
        actual_bits=[oracles.bits_str(int(x), width) for x in a_bits[:oracles.MAX_LISTED]],
        bit_histogram={b: c for b, c in hist.items() if c},
        max_abs_error=float(finite.max()) if finite.numel() else math.inf,
        note=(f"{note} bad_rows={len(rows)} rows(b,h,i)={[list(r) for r in rows[:oracles.MAX_LISTED]]} "
              f"tol_max={float(tol.max()) if hasattr(tol, 'max') else float(tol):.3g}").strip(),
    )


# ---- one case: the flow, written once for every backend ------------------------------------
#
# A backend supplies its named attention kernels (`AttentionKernel.call`: one forward + backward with its
# faults on, timed its way), the Backend its checks run on (torch: the device; JAX: numpy on
# the host copies its faults corrupt), its float64 reference (`CaseReference`) and how it keeps
# mismatches (`Keep`). `run_flow` owns the repeat rounds, the nonfinite / exact / reference /
# repeat-determinism / cross-kernel checks, the consensus hash and the speed metrics.


@dataclass(slots=True)
class AttentionKernel:
    """One named attention implementation of a backend, and what the flow records of it."""

    name: str
    call: Callable[[], tuple[dict[str, Any], float, float | None]]
    """One forward + backward with the backend's faults on: ({out, dq, dk, dv}, forward seconds,
    backward seconds), or (tensors, seconds of the whole call, None) where the two are one program."""
    deterministic: bool = True
    """False: documented nondeterministic backward; its repeat spread is measured, not bits compared."""
    warm: dict[str, Any] | None = None
    """The first call's outputs (untimed: the library warms up), checked as round 0 like any other."""
    first: dict[str, Any] = field(default_factory=dict)
    t_fwd: list[float] = field(default_factory=list)
    t_bwd: list[float | None] = field(default_factory=list)
    spread: float = 0.0


class CaseReference(Protocol):
    """A backend's float64 reference for one random case (its tolerance model is its own)."""

    def check(self, name: str, act: Any) -> Mismatch | None:
        """Oracle `fp64_reference` on output `name` of one call."""
        ...

    def spread(self, name: str, first: Any, act: Any) -> float:
        """How far a nondeterministic kernel's repeat moved, in units of the tolerance."""
        ...

    def cross(self, name: str, anchor: Any, other: Any, note: str) -> Mismatch | None:
        """Oracle `cross_backend` between two kernels' first rounds of output `name`."""
        ...


Keep = Callable[[CaseOutcome, Mismatch, "str | None", int], None]
"""Records a mismatch of kernel `name` (None: between kernels) found in round `r`."""


def run_flow(bk: Backend, kernels: list[AttentionKernel], inp: Inputs, shape: Shape, var: Variant, out: CaseOutcome, *,
             ref: CaseReference | None, keep: Keep, repeats: int, max_repeats: int,
             budget_s: float = 0.0) -> float:
    """Rounds of every kernel on the same inputs, each output checked as it comes; then the
    cross-kernel agreement, the hash and the metrics. Returns the seconds spent checking.

    `bk` holds the kernels' outputs (`inp.expected` too) and gives the deadline. Rounds: at least
    `repeats`, then more while `budget_s` lasts (without a deadline) up to `max_repeats`.
    """
    check_s = 0.0
    start = time.monotonic()
    r = 0
    while True:
        round_bad = False
        for kn in kernels:
            if kn.warm is not None:  # round 0 from the untimed first call: checked, never timed
                res, kn.warm = kn.warm, None
            else:
                res, t_f, t_b = kn.call()
                kn.t_fwd.append(t_f)
                kn.t_bwd.append(t_b)
            t0 = time.perf_counter()
            round_bad |= _check(bk, out, inp, ref, keep, kn, res, r)
            check_s += time.perf_counter() - t0
            del res
        r += 1
        out.repeats = r
        out.repeats_bad += round_bad
        if not all(kn.t_fwd for kn in kernels):
            continue  # at least one timed round after the warm one
        if r >= max_repeats:
            break
        if r >= repeats:
            deadline = bk.deadline
            past_deadline = deadline is not None and time.monotonic() >= deadline
            if (time.monotonic() - start >= budget_s and deadline is None) or past_deadline:
                break
    t0 = time.perf_counter()
    if ref is not None and len(kernels) >= 2:
        anchor = kernels[0]
        for kn in kernels[1:]:
            for name in TENSORS:
                m = ref.cross(name, anchor.first[name], kn.first[name], f"cross_backend={kn.name}_vs_{anchor.name}")
                if m is not None:
                    keep(out, m, None, 0)
    out.output_hash = _hash(bk, kernels)
    check_s += time.perf_counter() - t0
    _metrics(out, shape, var, kernels)
    return check_s


def _canon(bk: Backend, x: Any) -> Any:
    """-0 -> +0: the exact oracle's expected zeros have no sign (0 * negative is -0 in IEEE)."""
    return bk.where(x == 0, bk.zeros(tuple(x.shape), bk.dtype_name(x)), x)


def _check(bk: Backend, out: CaseOutcome, inp: Inputs, ref: CaseReference | None, keep: Keep, kn: AttentionKernel,
           res: dict[str, Any], r: int) -> bool:
    """Every oracle on one kernel's (out, dq, dk, dv) of round r; True when one fired."""
    bad = False
    for name in TENSORS:
        act = res[name]
        found: list[Mismatch | None] = [bo.nonfinite(bk, act, tensor=name)]
        if inp.expected:
            found.append(bo.compare_bits(bk, _canon(bk, inp.expected[name]), _canon(bk, act), tensor=name,
                                         oracle=Oracle.EXACT))
        elif ref is not None:
            found.append(ref.check(name, act))
        for m in filter(None, found):
            keep(out, m, kn.name, r)
            bad = True
        if r == 0:
            kn.first[name] = bk.copy(act)
        elif kn.deterministic or name == "out":
            rep = bo.compare_bits(bk, kn.first[name], act, tensor=name, oracle=Oracle.REPEAT)
            if rep is not None:
                out.nondeterministic = True
                keep(out, rep, kn.name, r)
        elif ref is not None:
            # documented nondeterministic: measure the spread, in units of the tolerance
            spread = ref.spread(name, kn.first[name], act)
            kn.spread = max(kn.spread, spread)
            if not spread <= 1.0:
                rep = bo.compare_bits(bk, kn.first[name], act, tensor=name, oracle=Oracle.REPEAT)
                if rep is not None:
                    out.nondeterministic = True
                    keep(out, replace(rep, note=f"spread_over_tol={spread:.3g} {rep.note}".strip()), kn.name, r)
    return bad


def _hash(bk: Backend, kernels: list[AttentionKernel]) -> str:
    """Bits of every deterministic output of every kernel (first round), for fleet consensus."""
    h = hashlib.sha256()
    for kn in kernels:
        for name in TENSORS:
            if kn.deterministic or name == "out":
                h.update(f"{kn.name}/{name}:{bo.array_hash(bk, kn.first[name])}".encode())
    return h.hexdigest()[:32]


def _flops(shape: Shape, var: Variant) -> tuple[float, float]:
    """(forward, forward + backward) flops: 4 b h s^2 d forward, 2.5x that backward, halved when causal."""
    fwd_flops = 4.0 * shape.b * shape.hq * shape.s**2 * shape.d * (0.5 if var.causal else 1.0)
    return fwd_flops, 3.5 * fwd_flops  # backward = 2.5x forward


def _metrics(out: CaseOutcome, shape: Shape, var: Variant, kernels: list[AttentionKernel]) -> None:
    """Speed per kernel (suffix `_<name>` after the first): the standard attention count, 4 b h s^2 d
    forward, 2.5x that backward, halved when causal; per pass where the kernel timed them apart."""
    fwd_flops, total = _flops(shape, var)
    for i, kn in enumerate(kernels):
        split = all(b is not None for b in kn.t_bwd)
        calls = [f + (b or 0.0) for f, b in zip(kn.t_fwd, kn.t_bwd, strict=True)]
        med, best = statistics.median(calls), min(calls)
        sfx = "" if i == 0 else f"_{kn.name}"
        out.metrics[f"tflops{sfx}"] = total / med / 1e12
        # the best call is what the chip can do (host noise only adds time): the fleet judges on it
        out.metrics[f"tflops_best{sfx}"] = total / best / 1e12
        out.metrics[f"time_ms{sfx}"] = med * 1e3
        if split:
            out.metrics[f"tflops_fwd{sfx}"] = fwd_flops / statistics.median(kn.t_fwd) / 1e12
            out.metrics[f"tflops_bwd{sfx}"] = 2.5 * fwd_flops / statistics.median(
                [b for b in kn.t_bwd if b is not None]) / 1e12
        if not kn.deterministic:
            out.metrics[f"repeat_spread{sfx}"] = kn.spread


# ---- the torch case: every SDPA backend as a kernel ----------------------------------------


@dataclass(slots=True)
class _TorchReference:
    """`Reference` (sampled groups, on the device) as the flow's CaseReference."""

    ref: Reference
    sigmas: float
    g_size: int

    def check(self, name: str, act: Any) -> Mismatch | None:
        ref = self.ref
        return tolerance_mismatch(ref.ref[name], ref.gather(name, act, self.g_size), ref.tolerance(name, self.sigmas),
                                  tensor=name, oracle=Oracle.REFERENCE, note=f"sigmas={self.sigmas:g}",
                                  to_index=lambda ix: ref.index(name, ix, self.g_size))

    def spread(self, name: str, first: Any, act: Any) -> float:
        ref = self.ref
        diff = (act.double() - first.double()).abs()
        return float((diff / (self.sigmas * ref.u_eff * ref.row_envelope(name) + ref.tiny)).max())

    def cross(self, name: str, anchor: Any, other: Any, note: str) -> Mismatch | None:
        ref = self.ref
        # min(|a|, |b|) and the reference's row envelope: a corrupted huge value must not widen
        # its own tolerance
        scale = anchor.double().abs().minimum(other.double().abs()) + ref.row_envelope(name)
        tol = 2 * self.sigmas * ref.u_eff * scale + 2 * ref.tiny
        return tolerance_mismatch(anchor.double(), other, tol, tensor=name, oracle=Oracle.CROSS_BACKEND,
                                  to_index=lambda ix: ix, note=note)


def _torch_keep(out: CaseOutcome, m: Mismatch, kernel: str | None, r: int) -> None:
    _keep(out, m if kernel is None else _note(m, f"backend={kernel}"), r)


def _run(ctx: ProbeContext, cfg: AttentionProbe.Config, case: str, shape: Shape, var: Variant,
         inp: Inputs) -> CaseOutcome:
    kind = "cuda" if ctx.device.type == "cuda" else ctx.device.type
    dtype_name = str(inp.q.dtype).removeprefix("torch.")
    out = CaseOutcome(case=case, params={
        "b": shape.b, "hq": shape.hq, "hkv": shape.hkv, "s": shape.s, "d": shape.d, "dtype": dtype_name,
        "causal": var.causal, "mask": var.mask, "gqa": shape.hkv != shape.hq,
        "mode": "exact" if var.exact else "random", "scale": inp.scale or 1.0 / math.sqrt(shape.d)})
    ran: list[AttentionKernel] = []
    skipped: dict[str, str] = {}
    with ctx.timer.exclusive():
        for name in cfg.backends:
            kernel = _sdpa_call(ctx, name, inp, var, shape)
            try:
                warm = _first_call(kernel)
            except _NoKernel as e:
                skipped[name] = str(e)
                continue
            ran.append(AttentionKernel(name, kernel, (kind, name) not in NONDETERMINISTIC_BACKWARD, warm=warm))
        ctx.timer.sync()
    out.params["backends"] = [kn.name for kn in ran]
    out.params["skipped"] = skipped
    if not ran:
        raise Unsupported(f"attention {case}: no SDPA backend can run it here ({skipped})")
    seed = ctx.seed ^ g.stream_id(case)
    ref = None if var.exact else _TorchReference(reference(inp, var, shape, cfg.ref_groups, seed), cfg.sigmas,
                                                 shape.group)
    check_s = run_flow(TorchBackend.of(ctx), ran, inp, shape, var, out, ref=ref, keep=_torch_keep,
                       repeats=cfg.repeats, max_repeats=cfg.max_repeats, budget_s=cfg.budget_s)
    out.params["timed_backend"] = ran[0].name
    out.params["flops_fwd_bwd"] = _flops(shape, var)[1]
    out.metrics["check_ms"] = 1e3 * check_s / max(1, out.repeats * len(ran))
    return out


def _sdpa_call(ctx: ProbeContext, name: str, inp: Inputs, var: Variant,
               shape: Shape) -> Callable[[], tuple[dict[str, Any], float, float | None]]:
    """One SDPA backend's fwd + bwd under the harness's host lock and faults, each pass timed."""

    def run() -> tuple[dict[str, Any], float, float | None]:
        with ctx.timer.exclusive(), ctx.under_test():
            return call(name, inp, var, shape, ctx.timer)

    return run


def _note(m: Mismatch, tag: str) -> Mismatch:
    return m if tag in m.note else replace(m, note=f"{tag} {m.note}".strip())


def _keep(out: CaseOutcome, m: Mismatch, repeat: int) -> None:
    """First mismatch per (oracle, tensor, backend), with the round it came from; later rounds
    add to its bit histogram and bad-element count, so the repeat rate stays visible."""
    backend = next((p for p in m.note.split() if p.startswith(("backend=", "cross_backend="))), "")
    for i, old in enumerate(out.mismatches):
        if old.oracle == m.oracle and old.tensor == m.tensor and backend and backend in old.note.split():
            hist = dict(old.bit_histogram)
            for b, c in m.bit_histogram.items():
                hist[b] = hist.get(b, 0) + c
            parts = old.note.split()
            rounds = next((int(p.split("=")[1]) for p in parts if p.startswith("bad_rounds=")), 1)
            note = " ".join(p for p in parts if not p.startswith("bad_rounds=")) + f" bad_rounds={rounds + 1}"
            out.mismatches[i] = replace(old, bit_histogram=hist, note=note)
            return
    out.mismatches.append(replace(m, note=f"{m.note} first_repeat={repeat} bad_rounds=1".strip()))
