"""Second-opinion GEMM probe: the vendor library against an independent kernel.

Catches: a chip whose library GEMM path (cuBLAS / tensor cores / MKL) computes wrong values
while a plain kernel on the same chip does not -- and, across the fleet, a wrong *library*:
- cuBLAS and the independent kernel disagree on one chip and agree on the others -> the chip;
- they disagree on every chip of a fingerprint -> the library (same bits everywhere).
(fleet/judge/second_opinion.py makes that call: the probe measures, the judge decides.)

The library GEMM is `torch.matmul` in float32 (code under test: --inject lands here). The
independent kernel is, on CUDA with cupy, a plain 16x16 shared-memory tiled RawKernel
(probes/cupy_kernels.sgemm, fp32 fma); elsewhere numpy's float64 matmul (another BLAS than
torch's, in another precision): the same comparison logic, tested on CPU workers.
Inputs are full-mantissa uniforms (no closed form), so the two are compared under the fp32
error model: |L - I| <= sigmas * 2**-24 * (|I| + 2 sqrt(k) sqrt((A*A)(B*B))), both sides counted.
Cost: two GEMMs and an O(n^2) comparison; quick on CPU (n=256) takes milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .. import generator as g
from ..results import Mismatch, Oracle
from .backends import backend_of, oracles
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register


@register("xgemm")
class SecondOpinionProbe(Probe):
    order = 15

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        sizes: dict[str, int] = field(default_factory=lambda: {"float32": 256})
        """Square GEMM size per dtype (float32 only: the independent kernel's dtype)."""
        sigmas: float = 12.0
        """Width of the tolerance in units of the fp32 rounding error model."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("xgemm", profile, device_kind)
        cfg = self.Config(sizes={d: int(n) for d, n in p["sizes"].items()}, sigmas=float(p.get("sigmas", 12.0)))
        if set(cfg.sizes) - {"float32"} or any(n < 1 for n in cfg.sizes.values()):
            raise InvalidConfig(f"xgemm: only float32 sizes >= 1 are supported; got {cfg.sizes}")
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return list(cfg.sizes)

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        if case not in cfg.sizes:
            raise InvalidConfig(f"unknown xgemm case {case!r}; known: {', '.join(cfg.sizes)}")
        import torch

        n = cfg.sizes[case]
        seed = ctx.seed ^ g.stream_id("xgemm/" + case)
        a = g.uniform((n, n), seed, "xgemm/A", device=ctx.device)
        b = g.uniform((n, n), seed, "xgemm/B", device=ctx.device)
        backend, independent = independent_gemm(ctx.device)
        with ctx.timer.exclusive():
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False  # the library must compute true fp32 too
            try:
                with ctx.under_test():
                    warm = torch.matmul(a, b)  # the library warms up: untimed, but its bits are checked
                    lib, t_lib = ctx.timer.time(lambda: torch.matmul(a, b))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
            ind, t_ind = ctx.timer.time(lambda: independent(a, b))
            spread, _ = ctx.timer.time(lambda: independent(a * a, b * b))
        out = CaseOutcome(case=case, params={"m": n, "n": n, "k": n, "dtype": case, "library": "torch.matmul",
                                             "independent": backend}, repeats=1)
        out.output_hash = oracles.array_hash(backend_of(lib), lib)
        m = disagreement(lib, ind, spread, k=n, sigmas=cfg.sigmas, independent=backend)
        if m is not None:
            out.mismatches.append(m)
            out.repeats_bad = 1
        first = oracles.compare_bits(backend_of(warm), lib, warm, tensor="C (first call)", oracle=Oracle.REPEAT)
        if first is not None:  # the first call gave other bits than the timed one: the chip's doing
            out.mismatches.append(first)
            out.repeats_bad = 1
        out.metrics["disagree_elements"] = float(m.bad_elements if m else 0)
        out.metrics["time_ms"] = t_lib * 1e3
        out.metrics["independent_ms"] = t_ind * 1e3
        out.metrics["tflops"] = 2.0 * n**3 / t_lib / 1e12
        out.metrics["independent_tflops"] = 2.0 * n**3 / t_ind / 1e12
        return out


def independent_gemm(device: Any) -> tuple[str, Any]:
    """(name, fn(a, b) -> torch float tensor on a's device) of the kernel that is not the library."""
    from . import cupy_kernels

    if cupy_kernels.available(device):
        return "cupy RawKernel sgemm_tiled (fp32)", cupy_kernels.sgemm
    return "numpy float64 matmul", _numpy_gemm


def _numpy_gemm(a: Any, b: Any) -> Any:
    import numpy as np
    import torch

    c = np.matmul(a.detach().cpu().numpy().astype(np.float64), b.detach().cpu().numpy().astype(np.float64))
    return torch.from_numpy(c).to(a.device)


def disagreement(lib: Any, ind: Any, spread: Any, *, k: int, sigmas: float, independent: str) -> Mismatch | None:
    """Elements where the library's C and the independent kernel's differ beyond both kernels'
    fp32 rounding: sigmas * 2**-24 * (|I| + 2 sqrt(k) sqrt(spread)), spread = (A*A)(B*B)."""
    import torch

    ref = ind.double()
    got = lib.double()
    tol = sigmas * 2.0**-24 * (ref.abs() + 2.0 * math.sqrt(k) * spread.double().clamp_min(0).sqrt()) + 1e-30
    err = (got - ref).abs()
    bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    where = torch.nonzero(bad)[: oracles.MAX_LISTED].cpu().tolist()
    finite = err[torch.isfinite(err)]
    return Mismatch(oracle=Oracle.REFERENCE, tensor="C", bad_elements=n_bad, total_elements=lib.numel(),
                    first_indices=where, expected=[float(ref[r, c]) for r, c in where],
                    actual=[float(got[r, c]) for r, c in where],
                    max_abs_error=float(finite.max()) if finite.numel() else math.inf,
                    note=f"second_opinion: torch.matmul vs {independent} (expected = independent kernel)")
