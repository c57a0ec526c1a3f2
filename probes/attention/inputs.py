"""Attention inputs: what a case is (`Shape`, `Variant`, `Inputs`) and its arrays, built from streams.

Written once against the backend layer (probes/backends/): `random_on` / `exact_on` build a case's
arrays on any Backend with identical bits (torch here, JAX in probes/jax_attention.py, numpy as the reference).
Their pure part is one traceable builder per mode (static: shape, dtype; arguments: the stream keys),
which a JAX backend compiles once. `random_inputs` / `exact_inputs` are the torch entry points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ... import generator as g
from ..backends.base import Backend
from ..backends.torch import TorchBackend
from ..base import InvalidConfig

TENSORS = ("out", "dq", "dk", "dv")
EXACT_SCALE = 256.0  # a power of two: q, k and sqrt(scale) stay exact in every dtype
EXACT_WINDOW = 8  # exact mode: each query targets one of the 8 keys at or before it


@dataclass(frozen=True, slots=True)
class Variant:
    causal: bool
    mask: bool
    gqa: bool
    exact: bool = False


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


_RANDOM_STREAMS = ("attention/q", "attention/k", "attention/v", "attention/dout", "attention/mask", "attention/pad")
_EXACT_STREAMS = ("attention/exact/xor", "attention/exact/target", "attention/exact/qspare", "attention/exact/v",
                  "attention/exact/dout")


def random_inputs(shape: Shape, var: Variant, dtype: Any, seed: int, device: Any) -> Inputs:
    """Full-mantissa uniform Q, K, V, dO in [-1, 1); the mask: uniform [-2, 2) plus -inf padding."""
    return random_on(TorchBackend(device), shape, var, str(dtype).removeprefix("torch."), seed)


def exact_inputs(shape: Shape, var: Variant, dtype: Any, seed: int, device: Any) -> Inputs:
    """One-hot attention whose out, dq, dk, dv are known exactly (see the package docstring and `exact_on`)."""
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

