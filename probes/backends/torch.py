"""The torch backend: a torch device, driven through the harness's ProbeContext.

Timing is the context's `Timer` (CUDA events on GPUs, thread CPU time on one-thread CPU
devices) inside its `exclusive()` host lock; faults are the TorchDispatchMode of
`ctx.under_test()` (probes/faults/), which corrupts the kernel's output tensor itself; the
deadline is the context's. Without a context (`TorchBackend(device)`) it is a plain torch array
backend: `backends.backend_of(tensor)` runs the shared oracles on any tensor's device that way.

torch is imported inside the functions: the probe registry imports this module, and the CLI
starts without torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import InvalidConfig, ProbeContext, Unsupported
from .base import FP8_TENSOR_CORE_SM90, FP32_ACCUMULATION, INT_BY_WIDTH, Accumulation, Backend


@dataclass(frozen=True, slots=True)
class Kernel:
    """How one dtype's GEMM is called through torch, and the numbers its error model needs."""

    name: str
    in_dtype: Any
    out_dtype: Any
    u_in: float  # relative rounding of inputs inside the kernel (tf32 rounds fp32 inputs)
    tf32: bool = False
    op: str = "mm"
    acc: Accumulation = FP32_ACCUMULATION  # how the kernel sums its dot products (the oracles' error model)

    @staticmethod
    def for_dtype(name: str, device: Any) -> Kernel:
        import torch

        if name == "float32":
            return Kernel(name, torch.float32, torch.float32, 0.0)
        if name == "tf32":
            if device.type != "cuda":
                raise Unsupported("tf32 needs a CUDA device with tensor cores")
            return Kernel(name, torch.float32, torch.float32, 2.0**-11, tf32=True)
        if name in ("bfloat16", "float16"):
            dt = getattr(torch, name)
            return Kernel(name, dt, dt, 0.0)
        if name == "float8_e4m3fn":
            if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
                raise Unsupported("fp8 GEMM needs a CUDA device with fp8 tensor cores (sm_89+)")
            # _scaled_mm without use_fast_accum: cuBLAS promotes the e8m13 tensor-core sums to fp32
            # periodically (Ada and Hopper measured; assumed, as the wider bound, on later chips)
            return Kernel(name, torch.float8_e4m3fn, torch.bfloat16, 0.0, op="_scaled_mm", acc=FP8_TENSOR_CORE_SM90)
        raise InvalidConfig(f"unknown dtype {name!r}")

    @property
    def in_name(self) -> str:
        return _name(self.in_dtype)

    @property
    def out_name(self) -> str:
        return _name(self.out_dtype)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        import torch

        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    def prepare(self, a32: Any, b32: Any) -> tuple[Any, Any]:
        """Inputs in this kernel's dtype (and layout: fp8 wants B column-major)."""
        a, b = a32.to(self.in_dtype), b32.to(self.in_dtype)
        if self.name == "float8_e4m3fn":
            b = b.t().contiguous().t()
        return a, b

    def __call__(self, a: Any, b: Any) -> Any:
        import torch

        if self.name == "float8_e4m3fn":
            one = torch.ones((), dtype=torch.float32, device=a.device)
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=self.out_dtype)
        return torch.matmul(a, b)


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class TorchBackend(Backend):
    """Arrays are torch tensors on `device`; with a ProbeContext, also the harness's timing and faults."""

    name = "torch"

    def __init__(self, device: Any, ctx: ProbeContext | None = None):
        import torch

        self.device = torch.device(device)
        self.ctx = ctx

    @staticmethod
    def of(ctx: ProbeContext) -> TorchBackend:
        return TorchBackend(ctx.device, ctx)

    # ---- the run -----------------------------------------------------------------------------

    def kernel(self, dtype: str) -> Kernel:
        return Kernel.for_dtype(dtype, self.device)

    @property
    def deadline(self) -> float | None:
        return self.ctx.deadline if self.ctx is not None else None

    def run(self, op: str, dtype: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        # `op` and `dtype` are for backends without a dispatch hook: the TorchDispatchMode sees the aten op
        # and its output itself.
        ctx = self._need_ctx()
        with ctx.timer.exclusive(), ctx.under_test():
            return ctx.timer.time(fn)

    def _need_ctx(self) -> ProbeContext:
        if self.ctx is None:
            raise RuntimeError("TorchBackend needs a ProbeContext to time and inject faults")
        return self.ctx

    # ---- arrays ------------------------------------------------------------------------------

    def arange(self, n: int) -> Any:
        import torch

        return torch.arange(n, dtype=torch.int64, device=self.device)

    def index(self, values: list[int]) -> Any:
        import torch

        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def uniform(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        from ... import generator as g

        return g.uniform(shape, seed, stream, device=self.device)

    def signs(self, shape: tuple[int, ...], seed: int, stream: str) -> Any:
        from ... import generator as g

        return g.signs(shape, seed, stream, device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        import torch

        return torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device)

    def concat(self, xs: list[Any], axis: int) -> Any:
        import torch

        return torch.cat(xs, dim=axis)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        import torch

        return torch.where(cond, a, b)

    def cast(self, x: Any, dtype: str) -> Any:
        import torch

        return x.to(getattr(torch, dtype))

    def dtype_name(self, x: Any) -> str:
        return _name(x.dtype)

    def dot(self, a: Any, b: Any) -> Any:
        return a @ b

    def dot64(self, a: Any, b: Any) -> Any:
        return a.double() @ b.double()

    def sum(self, x: Any, axis: int) -> Any:
        return x.sum(dim=axis)

    def isfinite(self, x: Any) -> Any:
        import torch

        return torch.isfinite(x)

    def copy(self, x: Any) -> Any:
        return x.clone()

    def bits(self, x: Any) -> Any:
        import torch

        return x.contiguous().view(getattr(torch, INT_BY_WIDTH[x.element_size()]))

    def equal(self, a: Any, b: Any) -> bool:
        import torch

        return torch.equal(a, b)  # stops at the first difference

    def nonzero_flat(self, mask: Any) -> Any:
        import torch

        return torch.nonzero(mask.reshape(-1)).reshape(-1)

    def count(self, x: Any) -> int:
        return int(x.sum())

    def max_abs_diff(self, a: Any, b: Any) -> float:
        import torch

        err = (a.double() - b.double()).abs()
        finite = err[torch.isfinite(err)]
        return float(finite.max()) if finite.numel() else float("inf")

    def to_host(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def host_bits(self, x: Any) -> np.ndarray:
        return self.bits(x.detach()).cpu().numpy()
