"""The numpy backend: the reference. The same probe, run on the host in numpy.

Golden values and tests: it needs no accelerator and no framework beyond numpy (bfloat16 and
float8 come from ml_dtypes, which jax brings). Its GEMM for 16- and 8-bit inputs is the error
model the oracles assume: inputs widened to float32, a float32 product, C rounded once to the
output dtype (numpy's own float16 matmul would accumulate in float16). tf32 is not emulated.

Faults: a `jax_backend.Injector` (the same `--inject` grammar and op names as the JAX path:
the GEMM is `dot_general`), applied to the output array in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import generator as g
from .. import jax_backend as jb
from ..base import Unsupported
from .base import FP32_ACCUMULATION, INT_BY_WIDTH, Accumulation, Backend

# case dtype -> (input dtype, output dtype), as the torch path's kernels have them
DTYPES = {"float32": ("float32", "float32"), "bfloat16": ("bfloat16", "bfloat16"),
          "float16": ("float16", "float16"), "float8_e4m3fn": ("float8_e4m3fn", "bfloat16")}


def np_dtype(name: str) -> np.dtype:
    """numpy's dtype for a name; bfloat16 and float8_e4m3fn from ml_dtypes."""
    if name in ("bfloat16", "float8_e4m3fn"):
        try:
            import ml_dtypes
        except ImportError:
            raise Unsupported(f"{name} on the numpy backend needs ml_dtypes (pip install ml_dtypes)") from None
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


@dataclass(frozen=True, slots=True)
class NumpyKernel:
    """C = A B with float32 accumulation, rounded once to the output dtype."""

    name: str
    in_name: str
    out_name: str
    u_in: float = 0.0
    op: str = "dot_general"
    acc: Accumulation = FP32_ACCUMULATION

    def settings(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def prepare(self, a32: Any, b32: Any) -> tuple[Any, Any]:
        dt = np_dtype(self.in_name)
        return np.ascontiguousarray(a32.astype(dt)), np.ascontiguousarray(b32.astype(dt))

    def __call__(self, a: Any, b: Any) -> Any:
        if self.in_name == "float32":
            return a @ b
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(np_dtype(self.out_name))


class NumpyBackend(Backend):
    """Arrays are numpy arrays on the host; faults come from `inj` (a jax_backend.Injector)."""

    name = "numpy"

    def __init__(self, inj: jb.Injector | None = None):
        self.inj = inj

    def kernel(self, dtype: str) -> NumpyKernel:
        if dtype not in DTYPES:
            raise Unsupported(f"{dtype} GEMM is not emulated by the numpy reference backend")
        i, o = DTYPES[dtype]
        np_dtype(i), np_dtype(o)  # fail early without ml_dtypes
        return NumpyKernel(dtype, i, o)

    def params(self) -> dict[str, Any]:
        return {"backend": "numpy"}

    def run(self, op: str, dtype: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        factor = self.inj.begin(op, dtype) if self.inj is not None else 1.0
        t0 = time.perf_counter()
        out = fn()
        dt = max(time.perf_counter() - t0, 1e-9)
        dt += jb.stall(dt * (factor - 1.0))
        if self.inj is not None:
            self.inj.corrupt(out)  # in place: `out` is the kernel's fresh output
        return out, dt

    # ---- arrays ------------------------------------------------------------------------------

    def arange(self, n: int) -> Any:
        return np.arange(n, dtype=np.int64)

    def index(self, values: list[int]) -> Any:
        return np.asarray(values, dtype=np.int64)

    def uniform(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        return g.uniform_np(shape, seed, stream)

    def signs(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        n = int(np.prod(shape))
        h = g.hash_indices(g.key(seed, stream), np.arange(n, dtype=np.int64).reshape(shape), n - 1)
        return 1 - 2 * ((h >> 7) & 1)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        return np.zeros(shape, dtype=np_dtype(dtype))

    def concat(self, xs: list[Any], axis: int) -> Any:
        return np.concatenate(xs, axis=axis)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    def cast(self, x: Any, dtype: str) -> Any:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf casts are expected here
            return np.asarray(x).astype(np_dtype(dtype))

    def dtype_name(self, x: Any) -> str:
        return np.asarray(x).dtype.name

    def dot(self, a: Any, b: Any) -> Any:
        return a @ b

    def dot64(self, a: Any, b: Any) -> Any:
        return a.astype(np.float64) @ b.astype(np.float64)

    def sum(self, x: Any, axis: int) -> Any:
        return x.sum(axis=axis)

    def isfinite(self, x: Any) -> Any:
        x = np.asarray(x)
        return np.isfinite(x) if x.dtype.kind in "fiub" else np.isfinite(x.astype(np.float64))

    def copy(self, x: Any) -> Any:
        return np.array(x, copy=True)

    def bits(self, x: Any) -> Any:
        x = np.ascontiguousarray(np.asarray(x))
        return x.view(INT_BY_WIDTH[x.dtype.itemsize])

    def equal(self, a: Any, b: Any) -> bool:
        return bool(np.array_equal(a, b))

    def nonzero_flat(self, mask: Any) -> Any:
        return np.flatnonzero(mask)

    def count(self, x: Any) -> int:
        return int(np.asarray(x).sum())

    def max_abs_diff(self, a: Any, b: Any) -> float:
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.abs(np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64))
        finite = err[np.isfinite(err)]
        return float(finite.max()) if finite.size else float("inf")

    def to_host(self, x: Any) -> np.ndarray:
        return np.asarray(x)
