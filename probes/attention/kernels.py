"""The call under test: one SDPA backend, selected explicitly (`torch.nn.attention.sdpa_kernel`).

`call` runs one forward + backward through one backend; `first_call` is a backend's untimed first
call, raising `NoKernel` when the backend cannot run the case (recorded, not an error).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from .inputs import Inputs, Shape, Variant

BACKENDS = ("flash", "cudnn", "efficient", "math")
# What each device kind offers, in order: the first backend that runs is the timed one.
OFFERED = {"cpu": ("flash", "math"), "cuda": ("flash", "cudnn", "efficient", "math")}
# Backends whose backward is nondeterministic (atomic adds into dq / dk / dv): repeats may differ
# in the last bits there, so the spread is measured instead of bits compared. cuDNN's too: on a
# healthy H200 (cuDNN 9.19, torch 2.11) its dq differed between repeats in 1 to 2644 elements of
# every bf16/fp16 random case (docs/benchmarks.md, 2026-12-04); torch leaves it out of its
# deterministic mode for that reason.
NONDETERMINISTIC_BACKWARD = {("cuda", "flash"), ("cuda", "efficient"), ("cuda", "cudnn")}


def _sdpa_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


class NoKernel(Exception):
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


def first_call(kernel: Callable[[], tuple[dict[str, Any], float, float | None]]) -> dict[str, Any]:
    """First call of a backend (library heuristics, caches), under its faults; its outputs are
    checked as round 0 of the flow, never timed. Raises NoKernel when the backend cannot run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return kernel()[0]
        except RuntimeError as e:
            if "No viable backend" in str(e) or "No available kernel" in str(e):
                why = [str(w.message).splitlines()[0] for w in caught if "sdp" in str(w.message).lower()
                       or "attention" in str(w.message).lower()]
                raise NoKernel("; ".join(why[:3]) or str(e).splitlines()[0]) from None
            raise
