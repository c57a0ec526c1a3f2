"""Deterministic GEMM probe.

Catches: silent tensor-core / datapath / memory corruption in GEMMs, nondeterministic chips,
throttled chips (throughput is measured here and judged against the fleet later).

Two cases per dtype:
- `exact`: +-1 / +-2 inputs built from a Sylvester-Hadamard matrix with seeded row/column
  permutations and signs, so C = A B is a scaled signed permutation matrix known in closed form.
  Every partial sum is an integer below 2**24, so the result is exact in any summation order,
  in every dtype (fp32, tf32, bf16, fp16, fp8) and on every vendor: any differing bit is an error.
- `random`: full-mantissa uniform inputs (the realistic datapath). Checked by Freivalds (rows and
  columns, locating the bad elements), repeat-determinism, a sampled fp64 reference with a
  dtype-aware tolerance, non-finite values, and a hash for fleet consensus.

Cost: each check is O(n^2) against the O(n^3) GEMM (see benchmarks/bench_matmul_overhead.py).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from ..results import Mismatch, Oracle
from . import generator as g
from . import oracles
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, Unsupported, profile_table, register

ALL_DTYPES = ("float32", "tf32", "bfloat16", "float16", "float8_e4m3fn")
# dtypes that need a capability of the device (reported by fleet.devices)
NEEDS = {"tf32": "tf32", "float8_e4m3fn": "fp8"}




@register("matmul")
class MatmulProbe(Probe):
    order = 10
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        sizes: dict[str, int] = field(default_factory=lambda: {"float32": 256})
        """Square GEMM size per dtype (a power of two: the exact case needs Hadamard order)."""
        repeats: int = 3
        """Minimum calls per case (repeat-determinism needs two or more)."""
        max_repeats: int = 3
        """Upper bound on calls per case when a time budget is set."""
        budget_s: float = 0.0
        """Seconds a case may keep repeating after `repeats` (0: exactly `repeats`)."""
        sample_rows: int = 8
        """Rows recomputed in float64 by the reference oracle."""
        sigmas: float = 12.0
        """Width of the statistical tolerance of Freivalds and the fp64 reference."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("matmul", profile, device_kind)
        sizes = {d: int(n) for d, n in p["sizes"].items() if d not in NEEDS or NEEDS[d] in capabilities}
        cfg = self.Config(sizes=sizes, repeats=int(p["repeats"]), max_repeats=int(p["max_repeats"]),
                          budget_s=float(p["budget_s"]))
        validate(cfg)
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return [f"{d}/{mode}" for d in cfg.sizes for mode in ("exact", "random")]

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        dtype_name, _, mode = case.partition("/")
        if dtype_name not in cfg.sizes or mode not in ("exact", "random"):
            raise InvalidConfig(f"unknown matmul case {case!r}")
        n = cfg.sizes[dtype_name]
        kernel = Kernel.for_dtype(dtype_name, ctx.device)
        seed = ctx.seed ^ g.stream_id(case)
        if mode == "exact":
            return _run_exact(ctx, cfg, case, kernel, n, seed)
        return _run_random(ctx, cfg, case, kernel, n, seed)


def validate(cfg: MatmulProbe.Config) -> None:
    for d, n in cfg.sizes.items():
        if d not in ALL_DTYPES:
            raise InvalidConfig(f"matmul: unknown dtype {d!r}; known: {', '.join(ALL_DTYPES)}")
        if n < 2 or n & (n - 1):
            raise InvalidConfig(f"matmul: size {n} for {d} must be a power of two >= 2 (Hadamard order)")
    if cfg.repeats < 2:
        raise InvalidConfig("matmul: repeats must be >= 2 (repeat-determinism compares calls)")


@dataclass(frozen=True, slots=True)
class Kernel:
    """How one dtype's GEMM is called, and the numbers its error model needs."""

    name: str
    in_dtype: Any
    out_dtype: Any
    u_in: float  # relative rounding of inputs inside the kernel (tf32 rounds fp32 inputs)
    tf32: bool = False

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
            return Kernel(name, torch.float8_e4m3fn, torch.bfloat16, 0.0)
        raise InvalidConfig(f"unknown dtype {name!r}")

    @contextlib.contextmanager
    def settings(self) -> Any:
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


# ---- exact case --------------------------------------------------------------------------


def _perm(size: int, seed: int, stream: str) -> tuple[int, int, int]:
    """Parameters (mult, add, xor) of the bijection i -> ((mult*i + add) mod size) ^ xor on [0, size)."""
    k1 = g.key(seed, stream + "/mult")
    k2 = g.key(seed, stream + "/add")
    k3 = g.key(seed, stream + "/xor")
    return (k1 | 1) % size | 1, k2 % size, k3 % size


def _apply_perm(idx: Any, size: int, p: tuple[int, int, int]) -> Any:
    mult, add, xr = p
    return ((idx * mult + add) % size) ^ xr


def sylvester(n: int, device: Any) -> Any:
    """Sylvester's Hadamard matrix of order n (a power of two) in float32: H[r, c] = (-1)^popcount(r & c).

    Built by doubling, [[H, H], [H, -H]]: about n^2 writes, far cheaper than a parity per element.
    """
    import torch

    h = torch.ones((1, 1), dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def hadamard_inputs(n: int, seed: int, device: Any) -> tuple[Any, Any, Any]:
    """(A, B, expected C) in float32 for the exact case; A B is k * diag-scaled signed permutation.

    A[i, l] = sa_i * H[pa(i), l],  B[l, j] = sb_j * H[l, pb(j)],  H[r, c] = (-1)^popcount(r & c),
    so (A B)[i, j] = sa_i sb_j n [pa(i) == pb(j)] because H H = n I for Sylvester's H.
    sa in {+-1, +-2}, sb in {+-1}: the largest partial sum is 2n.
    """
    import torch

    idx = torch.arange(n, dtype=torch.int64, device=device)
    pa, pb = _perm(n, seed, "hadamard/rows"), _perm(n, seed, "hadamard/cols")
    ra = _apply_perm(idx, n, pa)
    cb = _apply_perm(idx, n, pb)
    sa = g.signs((n,), seed, "hadamard/sa", device=device) * (1 + ((g.hash_indices(g.key(seed, "hadamard/ma"), idx) >> 3) & 1))
    sb = g.signs((n,), seed, "hadamard/sb", device=device)
    h = sylvester(n, device)
    a = h[ra] * sa.unsqueeze(1).to(torch.float32)
    b = h[:, cb] * sb.unsqueeze(0).to(torch.float32)
    # inverse of pb: the column j whose permuted index equals pa(i)
    inv = torch.empty(n, dtype=torch.int64, device=device)
    inv[cb] = idx
    cols = inv[ra]
    expected = torch.zeros((n, n), dtype=torch.float32, device=device)
    expected[idx, cols] = (sa * sb[cols] * n).to(torch.float32)
    return a, b, expected


def _run_exact(ctx: ProbeContext, cfg: MatmulProbe.Config, case: str, kernel: Kernel, n: int,
               seed: int) -> CaseOutcome:
    a32, b32, e32 = hadamard_inputs(n, seed, ctx.device)
    a, b = kernel.prepare(a32, b32)
    expected = e32.to(kernel.out_dtype)
    del a32, b32, e32
    out = CaseOutcome(case=case, params={"m": n, "n": n, "k": n, "dtype": kernel.name, "mode": "exact",
                                         "out_dtype": str(kernel.out_dtype).removeprefix("torch.")})
    times = _repeat(ctx, cfg, kernel, a, b, out, lambda c, r: _check_exact(expected, c, out, r))
    _finish(out, times, n)
    return out


def _check_exact(expected: Any, c: Any, out: CaseOutcome, r: int) -> bool:
    m = oracles.compare_bits(expected, c, tensor="C", oracle=Oracle.EXACT)
    if m is not None:
        _keep(out, m, r)
        return True
    return False


# ---- random case -------------------------------------------------------------------------


def _run_random(ctx: ProbeContext, cfg: MatmulProbe.Config, case: str, kernel: Kernel, n: int,
                seed: int) -> CaseOutcome:
    import torch

    # B is A with its rows reversed: independent enough for every oracle (the product is not
    # symmetric, so a transposed result is still caught) at half the generation cost.
    a32 = g.uniform((n, n), seed, "matmul/A", device=ctx.device)
    a, b = kernel.prepare(a32, a32.flip(0))
    # The oracles reason about the values the kernel was actually given (e.g. after fp8 rounding).
    a_ref, b_ref = a.float(), b.float()
    sig = cfg.sigmas
    plan = oracles.freivalds_plan(a_ref, b_ref, kernel.out_dtype, seed=seed, sigmas=sig, u_in=kernel.u_in)
    rows = torch.linspace(0, n - 1, min(cfg.sample_rows, n), device=ctx.device).long()
    out = CaseOutcome(case=case, params={"m": n, "n": n, "k": n, "dtype": kernel.name, "mode": "random",
                                         "out_dtype": str(kernel.out_dtype).removeprefix("torch.")})
    first: list[Any] = []
    repeat0_bad = [False]

    def check(c: Any, r: int) -> bool:
        bad = False
        if r > 0 and oracles.same_bits(c, first[0]):
            # The same bits as the first call, which every oracle checked: nothing new to learn.
            return repeat0_bad[0]
        fr = oracles.freivalds(plan, a_ref, b_ref, c, tensor="C")
        # NaN/Inf always trip Freivalds (a NaN residual fails every comparison): look for them only then
        for m in filter(None, [
            oracles.nonfinite(c, tensor="C") if fr is not None else None,
            fr,
            oracles.sampled_reference(a_ref, b_ref, c, kernel.out_dtype, rows=rows, tensor="C", sigmas=sig,
                                        u_in=kernel.u_in, b64=plan.b64)
            if r == 0 else None,
        ]):
            _keep(out, m, r)
            bad = True
        if r == 0:
            first.append(c.clone())
            out.output_hash = oracles.tensor_hash(c)
            repeat0_bad[0] = bad
        else:
            rep = oracles.compare_bits(first[0], c, tensor="C", oracle=Oracle.REPEAT)
            if rep is not None:
                out.nondeterministic = True
                _keep(out, rep, r)
        return bad

    times = _repeat(ctx, cfg, kernel, a, b, out, check)
    _finish(out, times, n)
    return out


# ---- shared ------------------------------------------------------------------------------


def _keep(out: CaseOutcome, m: Mismatch, repeat: int) -> None:
    """Keep the first mismatch per oracle (with the repeat it came from); count the rest."""
    for i, old in enumerate(out.mismatches):
        if old.oracle == m.oracle:
            hist = dict(old.bit_histogram)
            for b, c in m.bit_histogram.items():
                hist[b] = hist.get(b, 0) + c
            out.mismatches[i] = _replace(old, bit_histogram=hist,
                                         note=_bump_note(old.note, m.bad_elements))
            return
    out.mismatches.append(_replace(m, note=(m.note + f" first_repeat={repeat}").strip()))


def _bump_note(note: str, bad: int) -> str:
    parts = dict(p.split("=", 1) for p in note.split() if "=" in p)
    parts["later_repeats_bad_elements"] = str(int(parts.get("later_repeats_bad_elements", "0")) + bad)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def _replace(m: Mismatch, **kw: Any) -> Mismatch:
    from dataclasses import replace

    return replace(m, **kw)


def _repeat(ctx: ProbeContext, cfg: MatmulProbe.Config, kernel: Kernel, a: Any, b: Any, out: CaseOutcome,
            check: Any) -> list[float]:
    """Warm up, then call the GEMM `repeats`+ times; each call timed alone and checked."""
    times: list[float] = []
    check_s = 0.0
    with kernel.settings():
        with ctx.timer.exclusive():
            kernel(a, b)  # warm-up: library heuristics, caches, clocks
            ctx.timer.sync()
        start = time.monotonic()
        r = 0
        while True:
            with ctx.timer.exclusive(), ctx.under_test():
                c, dt = ctx.timer.time(lambda: kernel(a, b))
            times.append(dt)
            t0 = time.perf_counter()
            if check(c, r):
                out.repeats_bad += 1
            check_s += time.perf_counter() - t0
            r += 1
            out.repeats = r
            del c
            if r >= cfg.max_repeats and r >= cfg.repeats:
                break
            if r >= cfg.repeats:
                over_budget = time.monotonic() - start >= cfg.budget_s
                past_deadline = ctx.deadline is not None and time.monotonic() >= ctx.deadline
                if (over_budget and ctx.deadline is None) or past_deadline:
                    break
    out.metrics["check_ms"] = 1e3 * check_s / max(1, len(times))
    return times


def _finish(out: CaseOutcome, times: list[float], n: int) -> None:
    med = statistics.median(times)
    out.metrics["time_ms"] = med * 1e3
    out.metrics["tflops"] = 2.0 * n**3 / med / 1e12
    out.metrics["time_ms_min"] = min(times) * 1e3
    # The best call is what the chip can do; interference from the host only ever adds time,
    # so the fleet's slowness judgement uses this one.
    out.metrics["tflops_best"] = 2.0 * n**3 / min(times) / 1e12
    out.metrics["time_ms_max"] = max(times) * 1e3

