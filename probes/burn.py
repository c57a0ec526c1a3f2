"""Sustained-stress (burn) probe: GEMMs at full power until the time budget is spent.

Catches: chips that pass a one-shot check and go wrong after minutes of heat (the first bad
iteration and the second it happened are named), and chips that throttle (throughput over time,
with the second it started to drop, plus NVML clocks / temperature / power / throttle reasons
on NVIDIA GPUs).

Every iteration is the matmul probe's two cases of one dtype (gpu-burn style, but exact), with
matmul's inputs, kernel and checks (`matmul.exact_case` / `random_case`):
- `C_exact`: the Hadamard inputs, whose product is known in closed form: any differing bit is an error;
- `C_random`: full-mantissa random inputs, checked by Freivalds (O(n^2), locates the bad rows and
  columns) and, where no other oracle fired, against the first iteration's bits (a chip that drifts
  becomes nondeterministic). No rows are recomputed in fp64 (`sample_rows=0`).
Runs until `ctx.deadline` (set by the worker from `--duration`), else for `duration_s`.
Throughput is the GEMMs' own time (checks excluded), binned in windows of `window_s`; the
timeline (per window: throughput, bad iterations, NVML samples) is kept in params["timeline"].

Not part of a default run except under `--profile burnin` (`default_profiles`); `--probes burn`
runs it at any profile.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import generator as g
from ..results import Mismatch, Oracle
from .backends import Backend
from .backends.torch import TorchBackend
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register
from .keeping import KeepPolicy, Stamp, keep
from .matmul import ALL_DTYPES, NEEDS, MatmulProbe, exact_case, random_case

MAX_WINDOWS = 240  # timeline windows kept per case (longer runs are re-binned into wider windows)
# NVML clock-event ("throttle") reason bits, nvml.h nvmlClocksEventReason*.
REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
           0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
           0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
BENIGN = 0x1 | 0x2 | 0x10 | 0x100  # reasons that say nothing about a chip's health
KEEP = KeepPolicy(by_tensor=True, stamp=Stamp.FIRST_BAD_ITERATION)
"""The first mismatch per (oracle, tensor), stamped with the iteration and second it appeared."""


@register("burn")
class BurnProbe(Probe):
    order = 60
    default = False
    speed_metric: ClassVar[str] = "tflops"
    """Sustained (median) throughput, not the best iteration: a chip that throttled early in the
    burn, before its first quarter was over, keeps a full-speed best iteration and no step down
    between its quarters; its median still shows where it spent the burn (a CI run, 2026-12-01:
    0.46x its peer by the median, passed on the best iteration)."""
    default_profiles: ClassVar[frozenset[str]] = frozenset({"burnin"})
    """Profiles under which a run without --probes includes this probe (the runner's to honour)."""

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        sizes: dict[str, int] = field(default_factory=lambda: {"float32": 256})
        """Square GEMM size per dtype (a power of two: the exact inputs need Hadamard order)."""
        duration_s: float = 2.0
        """Seconds per case when the worker sets no deadline (no --duration)."""
        min_iterations: int = 4
        """Iterations run even when the deadline has already passed."""
        window_s: float = 0.25
        """Width of a throughput window of the timeline."""
        throttle_drop: float = 0.10
        """A window this much below the first one counts as dropped (for `throttle_onset_s`)."""
        sample_s: float = 5.0
        """Seconds between NVML samples (GPUs with pynvml)."""
        sigmas: float = 12.0
        """Width of Freivalds' statistical tolerance (matmul's `sigmas`)."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("burn", profile, device_kind)
        sizes = {d: int(n) for d, n in p.pop("sizes").items() if d not in NEEDS or NEEDS[d] in capabilities}
        known = set(self.Config.__dataclass_fields__)
        if set(p) - known:
            raise InvalidConfig(f"burn: unknown keys {sorted(set(p) - known)} in profiles/burn.toml")
        cfg = self.Config(sizes=sizes, **p)
        for d, n in cfg.sizes.items():
            if d not in ALL_DTYPES or n < 2 or n & (n - 1):
                raise InvalidConfig(f"burn: size {n} for {d!r} must be a power of two >= 2, dtype from {ALL_DTYPES}")
        if cfg.min_iterations < 2 or cfg.window_s <= 0 or not 0 < cfg.throttle_drop < 1:
            raise InvalidConfig("burn: min_iterations >= 2, window_s > 0 and 0 < throttle_drop < 1 are needed")
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return list(cfg.sizes)

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        if case not in cfg.sizes:
            raise InvalidConfig(f"unknown burn case {case!r}; known: {', '.join(cfg.sizes)}")
        return _burn(ctx, cfg, case, cfg.sizes[case])


@dataclass(slots=True)
class _Iter:
    t: float  # seconds since the burn started, at the iteration's start
    gemm_s: float
    bad: bool


def _burn(ctx: ProbeContext, cfg: BurnProbe.Config, case: str, n: int) -> CaseOutcome:
    bk: Backend = TorchBackend.of(ctx)
    kernel = bk.kernel(case)
    seed = ctx.seed ^ g.stream_id("burn/" + case)
    out = CaseOutcome(case=case, params={"m": n, "n": n, "k": n, "dtype": case, "gemms_per_iteration": 2})
    found: list[Mismatch] = []  # what the checks report, per call
    one = MatmulProbe.Config(sizes={case: n}, sigmas=cfg.sigmas, sample_rows=0)
    ah, bh, check_exact = exact_case(bk, one, kernel, n, seed, out, lambda m, _: found.append(m), tensor="C_exact")
    ar, br, check_random = random_case(bk, one, kernel, n, seed, out, lambda m, _: found.append(m), tensor="C_random")
    sampler = NvmlSampler(ctx.device)
    iters: list[_Iter] = []
    samples: list[tuple[float, dict[str, float]]] = []
    with kernel.settings(), ctx.timer.exclusive():
        # warm-up (library heuristics, caches): untimed but checked, like every call a chip computes
        warm_bad = found.pop() if check_exact(kernel(ah, bh), -1) else None
        with ctx.under_test():
            # The first op dispatched through an injector costs ~1 s once (Python dispatch
            # set-up); a non-GEMM op keeps that out of the first window and off fault counters.
            ah[:1, :1].neg()
        ctx.timer.sync()
        start = time.monotonic()
        end = ctx.deadline if ctx.deadline is not None else start + cfg.duration_s
        next_sample = start
        while len(iters) < cfg.min_iterations or time.monotonic() < end:
            now = time.monotonic()
            if sampler.ok and now >= next_sample:
                samples.append((now - start, sampler.sample()))
                next_sample = now + cfg.sample_s
            with ctx.under_test():
                c1, t1 = ctx.timer.time(lambda: kernel(ah, bh))
            with ctx.under_test():
                c2, t2 = ctx.timer.time(lambda: kernel(ar, br))
            i = len(iters)
            found.clear()
            bad = check_exact(c1, i) | check_random(c2, i)  # both run (`|`); bad also for bad bits seen before
            # bits that differ from the first iteration's add nothing where an oracle fired
            kept = [m for m in found if m.oracle is not Oracle.REPEAT or len(found) == 1]
            iters.append(_Iter(t=now - start, gemm_s=t1 + t2, bad=bad or bool(kept)))
            for m in kept:
                keep(out, m, KEEP, iteration=i, seconds=now - start)
        elapsed = time.monotonic() - start
    out.nondeterministic = any(m.oracle is Oracle.REPEAT for m in out.mismatches)  # only where no oracle fired
    _finish(out, cfg, iters, samples, 4.0 * n**3, elapsed)
    if warm_bad is not None:  # one more repeat, and a bad one: the chip was wrong before it was warm
        from dataclasses import replace

        out.repeats += 1
        out.repeats_bad += 1
        out.mismatches.insert(0, replace(warm_bad, note=(warm_bad.note + " on the warm-up call").strip()))
    return out


def _finish(out: CaseOutcome, cfg: BurnProbe.Config, iters: list[_Iter], samples: list[tuple[float, dict[str, float]]],
            flops: float, elapsed: float) -> None:
    out.repeats = len(iters)
    out.repeats_bad = sum(1 for it in iters if it.bad)
    rates = [flops / it.gemm_s / 1e12 for it in iters if it.gemm_s > 0]
    m = out.metrics
    m["iterations"] = float(len(iters))
    m["elapsed_s"] = elapsed
    m["tflops"] = statistics.median(rates)
    m["tflops_best"] = max(rates)
    m["time_ms"] = 1e3 * statistics.median(it.gemm_s for it in iters)
    bad = [i for i, it in enumerate(iters) if it.bad]
    if bad:
        m["first_bad_iteration"] = float(bad[0])
        m["first_bad_s"] = iters[bad[0]].t
    windows = timeline(iters, samples, flops, cfg.window_s)
    out.params["window_s"] = windows[0]["w_s"] if windows else cfg.window_s
    out.params["timeline"] = windows
    # Judged per iteration, not per time window: a throttled chip spends most of the run's time
    # (and so most windows) in its slow phase, and a window mixing both phases blurs the edge.
    step = max(1, len(rates) // 2000)  # long burn-ins: medians of consecutive iterations, 2000 points at most
    points = [(float(k), statistics.median(rates[k:k + step])) for k in range(0, len(rates), step)]
    ratio, onset = throttle_onset(points, cfg.throttle_drop)
    m["throughput_ratio"] = ratio
    if onset is not None:
        # Refine to the iteration: the best step fit over the whole run (windows only say roughly when).
        i = onset_iteration(iters, flops)
        if i is not None:
            m["throttle_onset_iteration"] = float(i)
            onset = iters[i].t
        m["throttle_onset_s"] = onset
    if samples:
        _nvml_summary(out, samples)


def timeline(iters: list[_Iter], samples: list[tuple[float, dict[str, float]]], flops: float,
             window_s: float) -> list[dict[str, Any]]:
    """Per-window throughput (GEMM time only), bad iterations and the window's last NVML sample."""
    if not iters:
        return []
    w = window_s
    while iters[-1].t / w >= MAX_WINDOWS:
        w *= 2
    bins: dict[int, list[_Iter]] = {}
    for it in iters:
        bins.setdefault(int(it.t // w), []).append(it)
    out = []
    for k in sorted(bins):
        its = bins[k]
        busy = sum(it.gemm_s for it in its)
        row: dict[str, Any] = {"t_s": k * w, "w_s": w, "iterations": len(its), "bad": sum(it.bad for it in its),
                               "tflops": flops * len(its) / busy / 1e12 if busy > 0 else 0.0}
        in_window = [s for t, s in samples if k * w <= t < (k + 1) * w]
        if in_window:
            row.update(in_window[-1])
        out.append(row)
    return out


def throttle_onset(windows: list[tuple[float, float]], drop: float) -> tuple[float, float | None]:
    """(throughput at the end / at the start, start of the sustained drop or None).

    Start and end are the medians of the first and the last quarter of the windows: a median,
    not the best window, so one lucky or unlucky window on a shared host moves nothing. The drop
    starts at the earliest window from which the windows' median stays more than `drop` below
    the start: a chip that slows and stays slow, not one noisy window.
    """
    import statistics

    if len(windows) < 4:
        return 1.0, None
    q = max(1, len(windows) // 4)
    values = [v for _, v in windows]
    base = statistics.median(values[:q])
    if base <= 0:
        return 1.0, None
    ratio = statistics.median(values[-q:]) / base
    if ratio >= 1.0 - drop:
        return ratio, None
    limit = (1.0 - drop) * base
    onset = None
    for i in range(len(values) - 1, 0, -1):
        if values[i] < limit and statistics.median(values[i:]) < limit:
            onset = windows[i][0]
        elif statistics.median(values[i:]) >= limit:
            break
    return ratio, onset


def onset_iteration(iters: list[_Iter], flops: float) -> int | None:
    """The iteration where throughput stepped down, or None if it did not drop.

    Robust step fit: the threshold is the geometric midpoint of the median throughput of the
    first and of the last quarter of the run, and the step goes where the fewest iterations fall
    on the wrong side of it. Every iteration counts once, so a burst of host noise (a worker
    descheduled for a moment) can neither start nor hide the drop.
    """
    rates = [flops / it.gemm_s for it in iters]
    n = len(rates)
    q = max(1, n // 4)
    if n < 4:
        return None
    fast, slow = statistics.median(rates[:q]), statistics.median(rates[-q:])
    if slow >= fast:
        return None
    thr = (fast * slow) ** 0.5
    below = [r < thr for r in rates]
    best_j, best = None, n + 1
    slow_before, fast_after = 0, below.count(False)
    for j, b in enumerate(below):
        wrong = slow_before + fast_after  # slow iterations before j, fast ones from j on
        if b and wrong < best:
            best_j, best = j, wrong
        slow_before += b
        fast_after -= not b
    return best_j


# ---- NVML --------------------------------------------------------------------------------


class NvmlSampler:
    """Clocks, temperature, power and clock-event reasons of one CUDA device (pynvml, optional)."""

    def __init__(self, device: Any):
        self.ok = False
        self.handle: Any = None
        if getattr(device, "type", "") != "cuda":
            return
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
            self.nvml = pynvml
            self.ok = True
        except Exception:  # no pynvml, no driver access: the burn still runs, without samples
            self.ok = False

    def sample(self) -> dict[str, float]:
        nv, h = self.nvml, self.handle
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return {
            "sm_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "mem_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            "temp_c": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3,
            "reasons": float(reasons_fn(h)),
        }


def reason_names(mask: int) -> list[str]:
    """Names of the NVML clock-event reason bits set in `mask`."""
    return [name for bit, name in REASONS.items() if mask & bit]


def _nvml_summary(out: CaseOutcome, samples: list[tuple[float, dict[str, float]]]) -> None:
    m = out.metrics
    vals = [s for _, s in samples]
    m["temp_c_max"] = max(s["temp_c"] for s in vals)
    m["power_w_mean"] = statistics.fmean(s["power_w"] for s in vals)
    m["sm_mhz_min"] = min(s["sm_mhz"] for s in vals)
    m["sm_mhz_max"] = max(s["sm_mhz"] for s in vals)
    seen = 0
    for t, s in samples:
        r = int(s["reasons"]) & ~BENIGN
        if r and "throttle_reason_onset_s" not in m:
            m["throttle_reason_onset_s"] = t
        seen |= r
    out.params["throttle_reasons"] = reason_names(seen)
