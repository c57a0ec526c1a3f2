"""The Backend interface: the few primitives probes/matmul.py, backends/oracles.py and the attention
inputs (attention.random_on / exact_on) use.

Not an array library: arrays of a backend support Python's operators (`+ - * % // ^ & | >> ==
!= < <= ~ @`, basic and integer-array indexing, `.shape`, `.reshape`), which torch, numpy and jax.numpy
share; everything they spell differently is a method here. Work stays on the device; only
small results (residual vectors, the few mismatching elements, a hash's bytes) reach the host.

Dtypes are named by strings ("float32", "bfloat16", "float8_e4m3fn", "int64", ...), the
spelling of torch, numpy/ml_dtypes and jax.numpy alike.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ... import generator as g
from ..base import Unsupported

__all__ = ["FP8_TENSOR_CORE_SM90", "FP32_ACCUMULATION", "Accumulation", "Backend", "Kernel", "Unsupported"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Accumulation:
    """How a GEMM kernel sums its k-long dot products: the accumulator the oracles' error model assumes.

    The k products are summed in chunks of `promote` products (0: one chunk, never promoted). Inside
    a chunk the running sum is rounded to `mantissa_bits` explicit mantissa bits once every `block`
    products (one tensor-core MMA instruction's k), by truncation or to nearest; each chunk's sum is
    then added into a float32 accumulator (round to nearest). docs/tolerances.md derives `rel_var`.
    """

    name: str
    mantissa_bits: int = 23
    truncate: bool = False
    block: int = 1
    promote: int = 0
    source: str = ""

    @property
    def unit(self) -> float:
        """Largest relative error of one rounding of the running sum (a whole ulp when truncating)."""
        return 2.0 ** -(self.mantissa_bits + (0 if self.truncate else 1))

    def rel_var(self, k: int) -> float:
        """Bound on E[err^2] / sum_l (a_l b_l)^2 of a k-long dot product of independent zero-mean products.

        Within a chunk of n roundings, the partial sums s_t have E[s_t^2] = (t/n) S_c^2. Rounding to
        nearest: independent zero-mean errors, variance <= u^2 sum_t E[s_t^2] <= n u^2 S_c^2 (the float32
        model the oracles always used). Truncation is biased toward zero, so the errors are not
        independent: by Cauchy-Schwarz, E[(sum_t u |s_t|)^2] <= n u^2 sum_t E[s_t^2] = u^2 n (n+1)/2 S_c^2.
        Chunks hold disjoint products (independent); their float32 additions add 2**-48 each.
        """
        if k <= 0:
            return 0.0
        chunk = k if self.promote <= 0 else min(self.promote, k)
        n = -(-chunk // self.block)
        u2 = self.unit**2
        within = u2 * (n * (n + 1) / 2 if self.truncate else n)
        chunks = -(-k // chunk)
        return within + (chunks * 2.0**-48 if chunks > 1 else 0.0)

    def describe(self) -> str:
        """One line for a result's params: width, rounding, block, promotion."""
        if self == FP32_ACCUMULATION:
            return "fp32 (round to nearest)"
        how = "truncated" if self.truncate else "rounded"
        promo = f", promoted to fp32 every {self.promote} products" if self.promote else ", never promoted"
        return f"{self.name}: e8m{self.mantissa_bits} {how} every {self.block} products{promo}"


FP32_ACCUMULATION = Accumulation(name="fp32")
"""Every product added into a float32 running sum, rounded to nearest."""

FP8_TENSOR_CORE_SM90 = Accumulation(
    name="fp8-tensor-core-sm90",
    mantissa_bits=13,
    truncate=True,
    block=32,
    promote=128,
    source="SageAttention2 (arXiv:2411.10958): the fp8 mma accumulator on Ada/Hopper is FP22 (e8m13), "
           "the low 10 bits of fp32 truncated; DeepSeek-V3 (arXiv:2412.19437) s3.3.2: ~14 bits, promoted "
           "to fp32 every 128 (4 WGMMAs of k=32); cuBLAS CUBLASLT_MATMUL_DESC_FAST_ACCUM=0 (torch._scaled_mm "
           "use_fast_accum=False) promotes periodically; CUTLASS GmmaFP8Accumulation mma_promotion_interval=4",
)
"""fp8 GEMM on Hopper/Ada tensor cores without fast accumulation (torch._scaled_mm's default)."""


class Kernel(Protocol):
    """One dtype's GEMM on one backend, and the numbers its error model needs (read-only: the
    implementations are frozen dataclasses)."""

    @property
    def name(self) -> str:
        """The case's dtype name (e.g. "tf32", "float8_e4m3fn")."""
        ...

    @property
    def in_name(self) -> str:
        """The dtype of the kernel's inputs."""
        ...

    @property
    def out_name(self) -> str:
        """The dtype of C."""
        ...

    @property
    def u_in(self) -> float:
        """Relative rounding of inputs inside the kernel (tf32 rounds float32 inputs to 2**-11)."""
        ...

    @property
    def acc(self) -> Accumulation:
        """How the kernel accumulates its dot products (FP32_ACCUMULATION unless a tensor core sums narrower)."""
        ...

    @property
    def op(self) -> str:
        """The op a fault spec's `op=` names for this kernel on this backend."""
        ...

    def prepare(self, a32: Any, b32: Any) -> tuple[Any, Any]:
        """float32 inputs in this kernel's dtype and layout."""
        ...

    def __call__(self, a: Any, b: Any) -> Any:
        """C = A B."""
        ...

    def settings(self) -> contextlib.AbstractContextManager[Any]:
        """Library settings held while the kernel runs (torch: allow_tf32)."""
        ...


class Backend(abc.ABC):
    """Where a probe's arrays live, how its kernel is called and timed, and how faults reach it."""

    name: str = ""

    # ---- the run -----------------------------------------------------------------------------

    @abc.abstractmethod
    def kernel(self, dtype: str) -> Kernel:
        """The GEMM for a case dtype; raises base.Unsupported where this backend or device lacks it."""

    def params(self) -> dict[str, Any]:
        """Extra case params recorded with every outcome (e.g. backend name, precision, device)."""
        return {}

    @property
    def deadline(self) -> float | None:
        """Monotonic time by which a time-budgeted probe must stop (None: follow the budget)."""
        return None

    @abc.abstractmethod
    def run(self, op: str, dtype: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run the code under test once with this backend's faults on; (output, seconds). `op` and `dtype`
        (its output's) say which faults match the call where the backend cannot see it run."""

    # ---- arrays on the device ----------------------------------------------------------------

    @abc.abstractmethod
    def arange(self, n: int) -> Any:
        """0 .. n-1 as int64."""

    @abc.abstractmethod
    def index(self, values: list[int]) -> Any:
        """A small int64 index array from host integers."""

    @abc.abstractmethod
    def uniform(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        """generator.uniform: float32 in [-1, 1), bit-identical on every backend."""

    @abc.abstractmethod
    def signs(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        """generator.signs: int64 +-1, bit-identical on every backend."""

    def hashed(self, k: Any, shape: tuple[int, ...]) -> Any:
        """generator.hash_indices of the element indices 0..n-1 under key `k`, shaped (int64).

        `k` is a host int or a device scalar (an element of `index(keys)`), so a compiled builder
        takes its stream keys as arguments; the largest index is known, so nothing is read back.
        """
        n = math.prod(shape)
        return g.hash_indices(k, self.arange(n), n - 1).reshape(shape)

    @abc.abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        """+0 everywhere."""

    def compile(self, fn: Callable[..., Any], *static: str) -> Callable[..., Any]:
        """`fn(backend, ...)` bound to this backend, as one program where the backend compiles (JAX:
        jitted, the arguments named in `static` compile-time constants; elsewhere `fn` itself).
        `fn` must be traceable: array primitives and operators only, nothing read back to the host."""
        return functools.partial(fn, self)

    @abc.abstractmethod
    def concat(self, xs: list[Any], axis: int) -> Any:
        """Arrays joined along `axis`."""

    @abc.abstractmethod
    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """Elementwise `a` where cond else `b` (b may be a Python scalar)."""

    @abc.abstractmethod
    def cast(self, x: Any, dtype: str) -> Any:
        """`x` rounded to `dtype` (round to nearest even)."""

    @abc.abstractmethod
    def dtype_name(self, x: Any) -> str:
        """The dtype of `x` by name."""

    @abc.abstractmethod
    def dot(self, a: Any, b: Any) -> Any:
        """Matrix/vector product of float32 operands in float32 at full precision (no bf16 passes)."""

    @abc.abstractmethod
    def dot64(self, a: Any, b: Any) -> Any:
        """Matrix product in float64 (operands are converted)."""

    @abc.abstractmethod
    def sum(self, x: Any, axis: int) -> Any:
        """Sum along `axis`."""

    @abc.abstractmethod
    def isfinite(self, x: Any) -> Any:
        """Elementwise: neither NaN nor +-Inf."""

    @abc.abstractmethod
    def copy(self, x: Any) -> Any:
        """A copy that later writes to `x` (faults included) cannot change."""

    # ---- bits and reductions -----------------------------------------------------------------

    @abc.abstractmethod
    def bits(self, x: Any) -> Any:
        """`x` viewed as signed integers of the same width (NaN payloads and signed zeros kept)."""

    @abc.abstractmethod
    def equal(self, a: Any, b: Any) -> bool:
        """Every element equal (shapes equal): one device reduction, one bool to the host."""

    def same_bits(self, a: Any, b: Any) -> bool:
        """Every bit of `a` equal to `b`'s (same shape and dtype): the repeat check of every call.
        A backend may fuse it into one pass (JAX: one compiled call)."""
        return self.equal(self.bits(a), self.bits(b))

    @abc.abstractmethod
    def nonzero_flat(self, mask: Any) -> Any:
        """Flat positions (int64, ascending) where `mask` is true."""

    def take_flat(self, x: Any, idx: Any) -> Any:
        """Elements of `x` at flat positions `idx`."""
        return x.reshape(-1)[idx]

    @abc.abstractmethod
    def count(self, x: Any) -> int:
        """The sum of a bool/int array, as a host int."""

    @abc.abstractmethod
    def max_abs_diff(self, a: Any, b: Any) -> float:
        """The largest finite |a - b| in float64, subnormals kept (inf when none is finite)."""

    # ---- to the host -------------------------------------------------------------------------

    @abc.abstractmethod
    def to_host(self, x: Any) -> np.ndarray:
        """A numpy array of a float32/float64/integer array (small results; may share memory: read only)."""

    def host_f64(self, x: Any) -> np.ndarray:
        """A small array's values as float64 on the host, exactly (a subnormal stays one)."""
        return self.to_host(self.cast(x, "float64"))

    def host_bits(self, x: Any) -> np.ndarray:
        """The bits of `x` as a host integer array (the consensus hash reads its bytes)."""
        return self.to_host(self.bits(x))


# ---- dtype facts shared by every backend ------------------------------------------------------

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
"""Half an ulp relative (2**-p for p significand bits), by dtype name; 2**-4 for anything else."""

INT_BY_WIDTH = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def unit_roundoff(dtype: str) -> float:
    """2**-p for a float dtype name with p significand bits."""
    return UNIT_ROUNDOFF.get(dtype, 2.0**-4)
