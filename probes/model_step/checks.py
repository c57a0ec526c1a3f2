"""The model probes' shared oracles and metrics: the state checksum and consensus hash, the fp64
reference, non-finite and repeat-determinism checks, and the speed metrics."""

from __future__ import annotations

import hashlib
import math
import statistics
import struct
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ...results import Mismatch, Oracle
from ..backends import backend_of, oracles
from ..base import CaseOutcome, ProbeContext
from .config import StepConfig

# Peak dense throughput (TFLOP/s) per precision, from vendor spec sheets, by device-name substring.
SPEC_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
}


# ---- checksums ---------------------------------------------------------------------------

_CHUNK = 1 << 22
_INTS = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def checksum(tensors: Iterable[Any]) -> Any:
    """An int64 scalar (on the tensors' device) that changes with any bit of any tensor, in order.

    sum_i bits_i * (2 i + 1) over the concatenated bits, with wrapping int64 arithmetic: exact and
    order-independent on every backend (unlike a float sum), a single flipped bit always changes it
    (the weight is odd), and moved elements change it too. Costs a few passes over the data, on the
    device, with no host copy, so it can run every step.
    """
    import torch

    total: Any = None
    offset = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        flat = flat.view(getattr(torch, _INTS[flat.element_size()]))
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start:start + _CHUNK].to(torch.int64)
            w = torch.arange(part.numel(), dtype=torch.int64, device=part.device).mul_(2).add_(2 * offset + 1)
            s = (part * w).sum()
            total = s if total is None else total + s
            offset += part.numel()
    if total is None:
        return torch.zeros((), dtype=torch.int64)
    return total


def trace_hash(losses: list[float], state: int) -> str:
    """Consensus hash: the loss trace's float32 bits and the state checksum."""
    h = hashlib.sha256(struct.pack(f"<{len(losses)}f", *losses) + struct.pack("<q", state))
    return h.hexdigest()[:32]


# ---- shared oracles ----------------------------------------------------------------------


def reference_mismatch(losses: list[float], ref: list[float], tol: float, tensor: str) -> Mismatch | None:
    """Losses outside tol * |ref| (or non-finite); the fp64 oracle's diagnosis."""
    bad = [i for i, (a, e) in enumerate(zip(losses, ref, strict=True))
           if not (math.isfinite(a) and abs(a - e) <= tol * abs(e))]
    if not bad:
        return None
    errs = [abs(losses[i] - ref[i]) for i in bad]
    return Mismatch(oracle=Oracle.REFERENCE, tensor=tensor, bad_elements=len(bad), total_elements=len(losses),
                    first_indices=[[i] for i in bad[:oracles.MAX_LISTED]],
                    expected=[ref[i] for i in bad[:oracles.MAX_LISTED]],
                    actual=[losses[i] for i in bad[:oracles.MAX_LISTED]],
                    max_abs_error=max(errs) if all(map(math.isfinite, errs)) else math.inf,
                    note=f"rtol={tol:g} first_bad_step={bad[0]}")


def nonfinite(losses: list[float], tensor: str) -> Mismatch | None:
    """Non-finite losses in a loss trace (the non-finite oracle)."""
    import torch

    t = torch.tensor(losses, dtype=torch.float32)
    return oracles.nonfinite(backend_of(t), t, tensor=tensor)


def repeat_mismatch(first: list[float], again: list[float], h0: int, h1: int, tensor: str) -> Mismatch | None:
    """Where two runs of the same steps differ: their loss traces bitwise, then their state checksums."""
    import torch

    a, b = torch.tensor(first, dtype=torch.float32), torch.tensor(again, dtype=torch.float32)
    m = oracles.compare_bits(backend_of(b), a, b, tensor=tensor, oracle=Oracle.REPEAT)
    if m is None and h0 == h1:
        return None
    if m is None:  # same losses, different final state: the last step's update differed
        return Mismatch(oracle=Oracle.REPEAT, tensor="state", bad_elements=1, total_elements=1,
                        note=f"state checksum {h0} vs {h1} with identical loss traces")
    return replace(m, note=f"first_bad_step={m.first_indices[0][0]} state_equal={h0 == h1}")


def speed_metrics(out: CaseOutcome, flops_per_token: float, tokens: int, step_s: list[float],
                  compute_s: list[float], ctx: ProbeContext, precision: str,
                  global_tokens: int | None = None) -> None:
    """tokens/s and TFLOP/s from per-step times (the first step, with its allocations, is left out
    when there are more); `tflops_best` uses the best compute time, which host noise cannot shorten."""
    steady = step_s[1:] if len(step_s) > 1 else step_s
    comp = compute_s[1:] if len(compute_s) > 1 else compute_s
    med = statistics.median(steady)
    out.metrics["step_ms"] = 1e3 * med
    out.metrics["tokens_per_s"] = (global_tokens or tokens) / med
    out.metrics["tflops"] = flops_per_token * tokens / statistics.median(comp) / 1e12
    out.metrics["tflops_best"] = flops_per_token * tokens / min(comp) / 1e12
    ceiling = _ceiling(ctx, precision)
    if ceiling:
        out.metrics["mfu"] = out.metrics["tflops"] / ceiling


def _ceiling(ctx: ProbeContext, precision: str) -> float | None:
    """The spec-sheet peak of this GPU for the precision (None on CPUs and unknown chips)."""
    if ctx.device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(ctx.device)
    for key, peaks in SPEC_TFLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def fp64_reference(cfg: StepConfig, mc: Any, tc: Any, seed: int, *, shards: int,
                   ctx: ProbeContext) -> list[float] | None:
    """The float64 loss trace of the same steps (None when `cfg.reference` is off)."""
    from ...model.train import reference_losses

    if cfg.reference == "off":
        return None
    dev = "cpu" if cfg.reference == "cpu" else ctx.device
    return reference_losses(mc, tc, seed=seed, steps=cfg.steps, shards=shards, device=dev)
