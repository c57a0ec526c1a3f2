"""Counter-based deterministic inputs: value = f(seed, stream, index).

Any slice of any tensor can be regenerated alone, on any backend, with identical bits:
the hash uses only 64-bit integer multiply / xor / shift / mask (which wrap identically
in torch CPU, torch CUDA, numpy and cupy), and the integer-to-float mapping is exact
(24-bit integers times a power of two). Low-precision tensors are the float32 values
rounded once by the backend's own cast (round-to-nearest-even everywhere).
"""

from __future__ import annotations

import hashlib
from typing import Any

MASK32 = 0xFFFFFFFF
# lowbias32's two multipliers and the golden-ratio index stride; probes/memory.py re-derives the
# same hash in int32 arithmetic on the device, so they are part of this module's interface.
MIX_M1 = 0x7FEB352D
MIX_M2 = 0x846CA68B
GOLDEN = 0x9E3779B9


def stream_id(name: str) -> int:
    """A stable 32-bit id for a named stream (e.g. "matmul/A"), independent of Python's hash seed."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def mix32_int(x: int) -> int:
    """The scalar version of the mixer (lowbias32), used to derive keys on the host."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_M1) & MASK32
    x ^= x >> 15
    x = (x * MIX_M2) & MASK32
    x ^= x >> 16
    return x


def key(seed: int, stream: str | int) -> int:
    """The 32-bit key of (seed, stream); every element of that stream hashes (key, index)."""
    sid = stream if isinstance(stream, int) else stream_id(stream)
    return mix32_int(mix32_int(seed & MASK32) ^ mix32_int((seed >> 32) ^ GOLDEN) ^ sid)


def _mix(x: Any) -> Any:
    """lowbias32 in place. Works on torch int64 tensors, numpy int64 arrays and cupy arrays alike:
    operands stay below 2**32, products wrap mod 2**64 and only their low 32 bits are kept."""
    x ^= x >> 16
    x *= MIX_M1
    x &= MASK32
    x ^= x >> 15
    x *= MIX_M2
    x &= MASK32
    x ^= x >> 16
    return x


def hash_indices(k: int, idx: Any, max_index: int | None = None) -> Any:
    """uint32 hashes (held in int64) of element indices `idx` under key `k` (idx is not modified).

    `max_index` (when the caller knows it) spares a pass over idx to learn whether any index has
    a non-zero high word, which only then needs mixing in.
    """
    x = idx * GOLDEN
    x += k
    x &= MASK32
    if max_index is None:
        size = idx.numel() if hasattr(idx, "numel") else idx.size
        max_index = int(idx.max()) if size else 0
    if max_index > MASK32:
        x ^= idx >> 32
    return _mix(x)


# ---- torch -------------------------------------------------------------------------------


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _torch_indices(shape: tuple[int, ...], offset: int, device: Any) -> Any:
    import torch

    n = 1
    for s in shape:
        n *= s
    return torch.arange(offset, offset + n, dtype=torch.int64, device=device).reshape(shape)


def uniform(shape: tuple[int, ...], seed: int, stream: str, *, device: Any = "cpu", dtype: Any = None,
            offset: int = 0) -> Any:
    """Uniform values in [-1, 1) with 24 random bits, as float32 then cast to `dtype` on the device."""
    import torch

    h = hash_indices(key(seed, stream), _torch_indices(shape, offset, device), offset + _numel(shape) - 1)
    x = (h >> 8).to(torch.float32) * (2.0**-23) - 1.0
    return x if dtype is None or dtype == torch.float32 else x.to(dtype)


def small_ints(shape: tuple[int, ...], seed: int, stream: str, radius: int, *, device: Any = "cpu",
               dtype: Any = None, offset: int = 0) -> Any:
    """Integers uniform in [-radius, radius] (exact in every float dtype for radius <= 8)."""
    import torch

    h = hash_indices(key(seed, stream), _torch_indices(shape, offset, device), offset + _numel(shape) - 1)
    x = (h % (2 * radius + 1) - radius).to(torch.float32)
    return x if dtype is None else x.to(dtype)


def signs(shape: tuple[int, ...], seed: int, stream: str, *, device: Any = "cpu", offset: int = 0) -> Any:
    """Random +-1 as int64 (one hash bit per element)."""
    h = hash_indices(key(seed, stream), _torch_indices(shape, offset, device), offset + _numel(shape) - 1)
    return 1 - 2 * ((h >> 7) & 1)


# ---- numpy (the reference backend; cupy takes the same code with cupy arrays) -------------


def uniform_np(shape: tuple[int, ...], seed: int, stream: str, offset: int = 0, xp: Any = None) -> Any:
    """numpy/cupy twin of `uniform` (float32): bit-identical to the torch version."""
    import numpy as np

    xp = xp or np
    idx = xp.arange(offset, offset + int(np.prod(shape)), dtype=xp.int64).reshape(shape)
    h = hash_indices(key(seed, stream), idx)
    return (h >> 8).astype(xp.float32) * xp.float32(2.0**-23) - xp.float32(1.0)


def small_ints_np(shape: tuple[int, ...], seed: int, stream: str, radius: int, offset: int = 0,
                  xp: Any = None) -> Any:
    import numpy as np

    xp = xp or np
    idx = xp.arange(offset, offset + int(np.prod(shape)), dtype=xp.int64).reshape(shape)
    h = hash_indices(key(seed, stream), idx)
    return (h % (2 * radius + 1) - radius).astype(xp.float32)
