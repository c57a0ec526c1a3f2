"""The JAX backend: one JAX device (TPU, GPU through jax[cuda], or a host CPU device).

- Kernel: `lax.dot_general(precision=HIGHEST, preferred_element_type=<input dtype>)`, jitted.
  HIGHEST matters: TPU's DEFAULT precision computes float32 GEMMs in bfloat16 passes, and the
  float32 case would test something else. Dtypes: float32, bfloat16, float16 (tf32 and fp8 are
  torch-only kernels).
- Timing and faults: `jax_backend.Injector.call(op, fn)` (wall time after block_until_ready on
  accelerators, process CPU time on JAX's CPU platform; `slow` busy-waits inside the timing).
  JAX has no dispatch hook, so a value fault due for a call is applied to a host copy of the
  output (`Injector.corrupt`: the same element and bit as the torch path) that is put back on
  the device: only a faulted call pays that copy, a clean one never leaves the device.
- The oracles' mat-vecs run with precision HIGHEST. float64 (the oracles' fp64 reference rows
  and located elements) needs `jax_enable_x64` (jax_backend.init); on TPUs, which have no
  float64 unit, those few rows are computed on the host instead (unverified: no TPU here).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import jax_backend as jb
from ..base import Unsupported
from .base import FP32_ACCUMULATION, INT_BY_WIDTH, Accumulation, Backend

DTYPES = ("float32", "bfloat16", "float16")
OP = "dot_general"
_HI = lax.Precision.HIGHEST


@dataclass(frozen=True, slots=True)
class JaxKernel:
    """A jitted dot_general at HIGHEST precision, C in the input dtype (as torch.matmul gives it)."""

    name: str
    device: Any
    fn: Any
    u_in: float = 0.0
    op: str = OP
    acc: Accumulation = FP32_ACCUMULATION

    @property
    def in_name(self) -> str:
        return self.name

    @property
    def out_name(self) -> str:
        return self.name

    def settings(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def prepare(self, a32: Any, b32: Any) -> tuple[Any, Any]:
        dt = getattr(jnp, self.name)
        return jax.device_put(a32.astype(dt), self.device), jax.device_put(b32.astype(dt), self.device)

    def __call__(self, a: Any, b: Any) -> Any:
        return self.fn(a, b)


# The per-repeat checks, jitted once: one compiled call each instead of a dispatch per op (eager
# JAX pays tens of microseconds per op, more than the check itself on a small GEMM).
def _bits(x: Any) -> Any:
    return lax.bitcast_convert_type(x, getattr(jnp, INT_BY_WIDTH[np.dtype(x.dtype).itemsize]))


_bitcast = jax.jit(_bits)
_array_equal = jax.jit(jnp.array_equal)
_same_bits = jax.jit(lambda a, b: jnp.array_equal(_bits(a), _bits(b)))
_dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=_HI))


@functools.cache
def _gemm(out_dtype: Any) -> Any:
    """One jitted GEMM per output dtype for the process's life (a fresh jit per case would compile again)."""
    def mm(a: Any, b: Any) -> Any:
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HI, preferred_element_type=out_dtype)

    return jax.jit(mm)


@functools.cache
def _compiled(fn: Callable[..., Any], static: tuple[str, ...], device: Any) -> Any:
    """`fn` bound to a JaxBackend on `device` and jitted, once per process (a fresh jit per case would
    trace again; its compiled programs are cached per shape, dtype and static arguments)."""
    return jax.jit(functools.partial(fn, JaxBackend(device)), static_argnames=static)


class JaxBackend(Backend):
    """Arrays are jax.Arrays on `device`; faults come from `inj` (a jax_backend.Injector)."""

    name = "jax"

    def __init__(self, device: Any = None, inj: jb.Injector | None = None):
        self.device = device if device is not None else jax.devices()[0]
        self.inj = inj
        # float64 on the device, except where there is no float64 unit (TPU): then on the host
        self._host64 = self.device.platform == "tpu"

    def kernel(self, dtype: str) -> JaxKernel:
        if dtype not in DTYPES:
            raise Unsupported(f"{dtype} GEMM is not implemented on the JAX path (float32, bfloat16, float16)")
        return JaxKernel(dtype, self.device, _gemm(getattr(jnp, dtype)))

    def params(self) -> dict[str, Any]:
        return {"precision": "HIGHEST", "backend": "jax", "jax_device": str(self.device)}

    def run(self, op: str, dtype: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.inj is None:
            return jb.timed(fn)
        c, dt = self.inj.call(op, dtype, fn)
        if self.inj.due:  # a value fault is due for this call: only then does C visit the host
            c = jax.device_put(self.inj.corrupt(jb.to_host(c)), self.device)
        return c, dt

    # ---- arrays ------------------------------------------------------------------------------

    def arange(self, n: int) -> Any:
        with jb.on_device(self.device):
            return jnp.arange(n, dtype=jnp.int64)

    def index(self, values: list[int]) -> Any:
        return jax.device_put(np.asarray(values, dtype=np.int64), self.device)

    def uniform(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        return jb.uniform(shape, seed, stream, device=self.device)

    def signs(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        return jb.signs(shape, seed, stream, device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        with jb.on_device(self.device):
            return jnp.zeros(shape, dtype=getattr(jnp, dtype))

    def compile(self, fn: Callable[..., Any], *static: str) -> Callable[..., Any]:
        return _compiled(fn, static, self.device)

    def concat(self, xs: list[Any], axis: int) -> Any:
        return jnp.concatenate(xs, axis=axis)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return jnp.where(cond, a, b)

    def cast(self, x: Any, dtype: str) -> Any:
        if dtype == "float64" and self._host64:
            return np.asarray(x).astype(np.float64)
        return x.astype(getattr(jnp, dtype))

    def dtype_name(self, x: Any) -> str:
        return np.dtype(x.dtype).name

    def dot(self, a: Any, b: Any) -> Any:
        return _dot(a, b)

    def dot64(self, a: Any, b: Any) -> Any:
        if self._host64:
            return np.asarray(a).astype(np.float64) @ np.asarray(b).astype(np.float64)
        return jnp.dot(a.astype(jnp.float64), b.astype(jnp.float64), precision=_HI)

    def sum(self, x: Any, axis: int) -> Any:
        return jnp.sum(x, axis=axis)

    def isfinite(self, x: Any) -> Any:
        return jnp.isfinite(x)

    def copy(self, x: Any) -> Any:
        return x  # jax.Arrays are immutable

    def bits(self, x: Any) -> Any:
        return _bitcast(jnp.asarray(x))

    def equal(self, a: Any, b: Any) -> bool:
        return bool(_array_equal(a, b))

    def same_bits(self, a: Any, b: Any) -> bool:
        return bool(_same_bits(a, b))

    def nonzero_flat(self, mask: Any) -> Any:
        return jnp.nonzero(mask.reshape(-1))[0]

    def count(self, x: Any) -> int:
        return int(jnp.sum(x))

    def max_abs_diff(self, a: Any, b: Any) -> float:
        # On the host: XLA flushes subnormals to zero (CPU and TPU), and the diagnosis must name
        # the value the chip produced. Only the mismatching elements come here.
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.abs(self.host_f64(a) - self.host_f64(b))
        finite = err[np.isfinite(err)]
        return float(finite.max()) if finite.size else float("inf")

    def to_host(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def host_f64(self, x: Any) -> np.ndarray:
        with np.errstate(invalid="ignore"):  # NaN from ml_dtypes' bfloat16 warns
            return np.asarray(x).astype(np.float64)  # on the host: a subnormal stays one (see max_abs_diff)
