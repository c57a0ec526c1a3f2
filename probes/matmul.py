"""Deterministic GEMM probe, written once against the backend layer (probes/backends/).

Catches: silent tensor-core / datapath / memory corruption in GEMMs, nondeterministic chips,
throttled chips (throughput is measured here and judged against the fleet later).

Two cases per dtype:
- `exact`: +-1 / +-2 inputs built from a Sylvester-Hadamard matrix with seeded row/column
  permutations and signs, so C = A B is a scaled signed permutation matrix known in closed form.
  Every partial sum is an integer below 2**24, so the result is exact in any summation order,
  in every dtype (fp32, tf32, bf16, fp16, fp8) and on every vendor: any differing bit is an error.
- `random`: full-mantissa uniform inputs (the realistic datapath). Checked by Freivalds (rows and
  columns, locating the bad elements), repeat-determinism, a sampled fp64 reference with a
  dtype-aware tolerance (whose error model includes the kernel's accumulator: fp8 tensor cores sum
  in e8m13, docs/tolerances.md), non-finite values, and a hash for fleet consensus (identical bits:
  no tolerance).

`run(bk, cfg, case, seed)` is the probe: inputs, case flow, the repeat loop, the oracle calls
(probes/backends/oracles.py, on the backend's device) and the metrics. `MatmulProbe` runs it on
a torch device (backends.torch), probes/jax_matmul.py on a JAX device (backends.jax), and the
numpy reference backend (backends.numpy) on the host.

Cost: each check is O(n^2) against the O(n^3) GEMM (see `benchmarks/bench_matmul.py overhead`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import generator as g
from ..results import Mismatch, Oracle
from .backends import oracles as ora
from .backends.base import Backend
from .backends.base import Kernel as KernelLike
from .backends.torch import Kernel, TorchBackend
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register
from .keeping import KeepPolicy, Stamp, Tally, keep

__all__ = ["ALL_DTYPES", "NEEDS", "Kernel", "MatmulProbe", "exact_case", "hadamard",
           "random_case", "run", "validate"]

ALL_DTYPES = ("float32", "tf32", "bfloat16", "float16", "float8_e4m3fn")
# dtypes that need a capability of the device (reported by fleet.devices)
NEEDS = {"tf32": "tf32", "float8_e4m3fn": "fp8"}
MODES = ("exact", "random")
# The first mismatch per oracle, with the repeat it came from; later repeats add their flipped bits
# and bad elements to it, so the repeat rate stays visible.
KEEP = KeepPolicy(histogram=True, tally=Tally.LATER_BAD_ELEMENTS, stamp=Stamp.FIRST_REPEAT)
Report = Callable[[Mismatch, int], None]  # where a case's check hands each mismatch, with its call r
Check = Callable[[Any, int], bool]  # a case's check of call r's C: True when it is bad


@register("matmul")
class MatmulProbe(Probe):
    order = 10
    jax = "jax_matmul"
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
        return [f"{d}/{mode}" for d in cfg.sizes for mode in MODES]

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        return run(TorchBackend.of(ctx), cfg, case, ctx.seed)


def validate(cfg: MatmulProbe.Config) -> None:
    for d, n in cfg.sizes.items():
        if d not in ALL_DTYPES:
            raise InvalidConfig(f"matmul: unknown dtype {d!r}; known: {', '.join(ALL_DTYPES)}")
        if n < 2 or n & (n - 1):
            raise InvalidConfig(f"matmul: size {n} for {d} must be a power of two >= 2 (Hadamard order)")
    if cfg.repeats < 2:
        raise InvalidConfig("matmul: repeats must be >= 2 (repeat-determinism compares calls)")


def run(bk: Backend, cfg: MatmulProbe.Config, case: str, seed: int) -> CaseOutcome:
    """One matmul case on backend `bk`; `seed` is the run's base seed (the case's stream is mixed in here)."""
    dtype_name, _, mode = case.partition("/")
    if dtype_name not in cfg.sizes or mode not in MODES:
        raise InvalidConfig(f"unknown matmul case {case!r}")
    n = cfg.sizes[dtype_name]
    kernel = bk.kernel(dtype_name)
    seed ^= g.stream_id(case)
    out = CaseOutcome(case=case, params={"m": n, "n": n, "k": n, "dtype": kernel.name, "mode": mode,
                                         "out_dtype": kernel.out_name, **bk.params()})
    if mode == "random":  # the error model of the tolerances: how this kernel accumulates (docs/tolerances.md)
        out.params["accumulation"] = kernel.acc.describe()
    setup = exact_case if mode == "exact" else random_case
    a, b, check = setup(bk, cfg, kernel, n, seed, out, lambda m, r: keep(out, m, KEEP, repeat=r))
    times = _repeat(bk, cfg, kernel, a, b, out, check)
    _finish(out, times, n)
    return out


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


def sylvester_on(bk: Backend, n: int) -> Any:
    """Sylvester's Hadamard matrix of order n (a power of two) in float32: H[r, c] = (-1)^popcount(r & c).

    Built by doubling, [[H, H], [H, -H]]: about n^2 writes, far cheaper than a parity per element.
    """
    h = bk.cast(bk.index([1]), "float32").reshape(1, 1)
    while h.shape[0] < n:
        h = bk.concat([bk.concat([h, h], 1), bk.concat([h, -h], 1)], 0)
    return h


def hadamard(bk: Backend, n: int, seed: int) -> tuple[Any, Any, Any]:
    """(A, B, expected C) in float32 on `bk` for the exact case; A B is n * a signed (1, 2)-scaled permutation.

    A[i, l] = sa_i * H[pa(i), l],  B[l, j] = sb_j * H[l, pb(j)],  H[r, c] = (-1)^popcount(r & c),
    so (A B)[i, j] = sa_i sb_j n [pa(i) == pb(j)] because H H = n I for Sylvester's H.
    sa in {+-1, +-2}, sb in {+-1}: the largest partial sum is 2n. Bit-identical on every backend.
    """
    idx = bk.arange(n)
    ra = _apply_perm(idx, n, _perm(n, seed, "hadamard/rows"))
    cb = _apply_perm(idx, n, _perm(n, seed, "hadamard/cols"))
    ma = 1 + ((g.hash_indices(g.key(seed, "hadamard/ma"), idx, n - 1) >> 3) & 1)
    sa = bk.cast(bk.signs((n,), seed, "hadamard/sa") * ma, "float32")
    sb = bk.cast(bk.signs((n,), seed, "hadamard/sb"), "float32")
    h = sylvester_on(bk, n)
    a = h[ra] * sa[:, None]
    b = h[:, cb] * sb[None, :]
    # Elementwise, no scatter: C[i, j] = sa_i sb_j n where pa(i) == pb(j), else +0.
    expected = bk.where(ra[:, None] == cb[None, :], sa[:, None] * (sb * n)[None, :], 0.0)
    return a, b, expected


def exact_case(bk: Backend, cfg: MatmulProbe.Config, kernel: KernelLike, n: int, seed: int, out: CaseOutcome,
               report: Report, tensor: str = "C") -> tuple[Any, Any, Check]:
    """The exact case's A, B (prepared for `kernel`) and its check: C against the closed form, bit for bit."""
    a32, b32, e32 = hadamard(bk, n, seed)
    a, b = kernel.prepare(a32, b32)
    expected = bk.cast(e32, kernel.out_name)
    del a32, b32, e32

    def check(c: Any, r: int) -> bool:
        m = ora.compare_bits(bk, expected, c, tensor=tensor, oracle=Oracle.EXACT)
        if m is not None:
            report(m, r)
        return m is not None

    return a, b, check


# ---- random case -------------------------------------------------------------------------


def sample_rows(n: int, count: int) -> list[int]:
    """The rows the float64 reference recomputes: evenly spread, as torch.linspace(...).long() gives them."""
    import torch

    return torch.linspace(0, n - 1, min(count, n)).long().tolist()


def random_case(bk: Backend, cfg: MatmulProbe.Config, kernel: KernelLike, n: int, seed: int, out: CaseOutcome,
                report: Report, tensor: str = "C") -> tuple[Any, Any, Check]:
    """The random case's A, B (for `kernel`) and its check of call r's C: Freivalds, non-finite, on call 0
    the fp64 reference and hash, on later calls call 0's bits (REPEAT, reported last)."""
    # B is A with its rows reversed: independent enough for every oracle (the product is not
    # symmetric, so a transposed result is still caught) at half the generation cost.
    a32 = bk.uniform((n, n), seed, "matmul/A")
    a, b = kernel.prepare(a32, a32[(n - 1) - bk.arange(n)])
    del a32
    # The oracles reason about the values the kernel was actually given (e.g. after fp8 rounding).
    a_ref, b_ref = bk.cast(a, "float32"), bk.cast(b, "float32")
    sig = cfg.sigmas
    plan = ora.freivalds_plan(bk, a_ref, b_ref, kernel.out_name, seed=seed, sigmas=sig, u_in=kernel.u_in,
                              acc=kernel.acc)
    rows = sample_rows(n, cfg.sample_rows)
    first: list[Any] = []
    repeat0_bad = [False]

    def check(c: Any, r: int) -> bool:
        if r > 0 and ora.same_bits(bk, c, first[0]):
            # The same bits as the first call, which every oracle checked: nothing new to learn.
            return repeat0_bad[0]
        bad = False
        fr = ora.freivalds(bk, plan, a_ref, b_ref, c, tensor=tensor)
        # NaN/Inf always trip Freivalds (a NaN residual fails every comparison): look for them only then
        for m in filter(None, [
            ora.nonfinite(bk, c, tensor=tensor) if fr is not None else None,
            fr,
            ora.sampled_reference(bk, a_ref, plan.b64, c, kernel.out_name, rows=rows, tensor=tensor, sigmas=sig,
                                  u_in=kernel.u_in, acc=kernel.acc)
            if r == 0 and rows else None,
        ]):
            report(m, r)
            bad = True
        if r == 0:
            first.append(bk.copy(c))
            out.output_hash = ora.array_hash(bk, c)
            repeat0_bad[0] = bad
        else:
            rep = ora.compare_bits(bk, first[0], c, tensor=tensor, oracle=Oracle.REPEAT)
            if rep is not None:
                out.nondeterministic = True
                report(rep, r)
        return bad

    return a, b, check


# ---- shared ------------------------------------------------------------------------------


def _repeat(bk: Backend, cfg: MatmulProbe.Config, kernel: KernelLike, a: Any, b: Any, out: CaseOutcome,
            check: Check) -> list[float]:
    """Call the GEMM `repeats`+ times (to `max_repeats` within the time budget or the deadline),
    each under the backend's faults and checked. The first call warms the library (heuristics,
    caches, clocks, compilation): it is checked like every other (a chip may fail only its first
    call) but never timed; every later call is timed alone."""
    times: list[float] = []
    check_s = 0.0
    with kernel.settings():
        start = time.monotonic()
        r = 0
        while True:
            c, dt = bk.run(kernel.op, kernel.out_name, lambda: kernel(a, b))
            if r > 0:
                times.append(dt)
            t0 = time.perf_counter()
            if check(c, r):
                out.repeats_bad += 1
            check_s += time.perf_counter() - t0
            r += 1
            out.repeats = r
            del c
            if not times:
                continue  # at least one timed call after the warm one
            if r >= cfg.max_repeats and r >= cfg.repeats:
                break
            if r >= cfg.repeats:
                deadline = bk.deadline
                over_budget = time.monotonic() - start >= cfg.budget_s
                past_deadline = deadline is not None and time.monotonic() >= deadline
                if (over_budget and deadline is None) or past_deadline:
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

