"""Device memory bandwidth probe.

Catches: chips whose memory runs slow (a degraded HBM stack, a bad memory clock, ECC
retirement storms), and copies that move the wrong bits.

Two cases, each timed `repeats` times after a warm-up, every call alone:
- `copy`: device-to-device `dst.copy_(src)`; counts bytes read plus bytes written (2 x size).
  Every copy is checked bit for bit against its source (outside the timed call).
- `read`: a read-only stream, `src.sum()` (one read of the buffer; the tiny result is ignored
  for speed and checked for repeat-determinism).
Metrics: `gbps` (median call), `gbps_best` (best call: the fleet's slowness metric for this
probe, `speed_metric`), `time_ms`, and against the spec sheet where the device is known
(`spec_gbps`, `ratio_to_spec`; table `[spec]` in profiles/bandwidth.toml). The probe measures;
the fleet decides who is slow.
Cost: quick on CPU copies 64 MiB 8 times (~0.3 s); on an H100 4 GiB 20 times (~0.1 s).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import generator as g
from ..results import Oracle
from .backends import backend_of, oracles
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register

CASES = ("copy", "read")


@register("bandwidth")
class BandwidthProbe(Probe):
    order = 35
    speed_metric: ClassVar[str] = "gbps_best"
    speed_kernel: ClassVar[str] = "copy"
    """Higher-is-better metric the fleet's slowness judgement should compare for this probe."""

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        mib: int = 64
        """Buffer size in MiB (well past the last-level cache, so DRAM/HBM is what is timed)."""
        repeats: int = 8
        """Timed calls per case (after one warm-up call)."""
        cases: tuple[str, ...] = CASES
        """Which streams run."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("bandwidth", profile, device_kind)
        cfg = self.Config(mib=int(p["mib"]), repeats=int(p["repeats"]), cases=tuple(p.get("cases", CASES)))
        if cfg.mib < 1 or cfg.repeats < 2 or any(c not in CASES for c in cfg.cases):
            raise InvalidConfig(f"bandwidth: need mib >= 1, repeats >= 2 and cases from {CASES}; got {cfg}")
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return list(cfg.cases)

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        if case not in CASES:
            raise InvalidConfig(f"unknown bandwidth case {case!r}; known: {', '.join(CASES)}")
        import torch

        n = cfg.mib * 2**20 // 4
        seed = ctx.seed ^ g.stream_id("bandwidth/" + case)
        src = source(n, seed, ctx.device)
        out = CaseOutcome(case=case, params={"bytes": n * 4, "dtype": "float32", "op": case,
                                             "bytes_per_call": (2 if case == "copy" else 1) * n * 4})
        times: list[float] = []
        first: list[Any] = []
        with ctx.timer.exclusive():
            if case == "copy":
                dst = torch.empty_like(src)
                dst.copy_(src)  # warm-up: page faults, clocks
                for _ in range(cfg.repeats):
                    dst.zero_()
                    with ctx.under_test():
                        _, dt = ctx.timer.time(lambda: dst.copy_(src))
                    times.append(dt)
                    if torch.equal(src.view(torch.int32), dst.view(torch.int32)):
                        continue
                    m = oracles.compare_bits(backend_of(dst), src, dst, tensor="dst", oracle=Oracle.EXACT)
                    if m is not None:
                        out.repeats_bad += 1
                        if not out.mismatches:
                            out.mismatches.append(m)
            else:
                src.sum()
                for r in range(cfg.repeats):
                    with ctx.under_test():
                        s, dt = ctx.timer.time(lambda: src.sum())
                    times.append(dt)
                    if r == 0:
                        first.append(s)
                    elif not torch.equal(s, first[0]):
                        out.nondeterministic = True
        out.repeats = cfg.repeats
        moved = out.params["bytes_per_call"]
        out.metrics["time_ms"] = statistics.median(times) * 1e3
        out.metrics["time_ms_min"] = min(times) * 1e3
        out.metrics["gbps"] = moved / statistics.median(times) / 1e9
        out.metrics["gbps_best"] = moved / min(times) / 1e9
        spec = spec_gbps(ctx.device)
        if spec:
            out.metrics["spec_gbps"] = spec
            out.metrics["ratio_to_spec"] = out.metrics["gbps_best"] / spec
        return out


def source(n: int, seed: int, device: Any) -> Any:
    """n seeded float32 values in [1, 2): random mantissas (real bit traffic, no compressible
    zeros), a finite sum; built with the memory probe's int32 hash (cheap on a CPU worker)."""
    import torch

    from .memory import pattern_words

    w = pattern_words("random", 0, n, 0, g.key(seed, "bandwidth/src"), device)
    return ((w & 0x007FFFFF) | 0x3F800000).view(torch.float32)


def spec_gbps(device: Any) -> float | None:
    """The spec-sheet memory bandwidth of this device's model (GB/s), or None when not listed."""
    if getattr(device, "type", "") != "cuda":
        return None
    import tomllib
    from importlib import resources

    import torch

    name = torch.cuda.get_device_name(device)
    table = tomllib.loads(resources.files("chipcheck.probes").joinpath("profiles", "bandwidth.toml").read_text())
    # Longest matching key first: "H100 PCIe" before "H100".
    for key in sorted(table.get("spec", {}), key=len, reverse=True):
        if key.lower() in name.lower():
            return float(table["spec"][key])
    return None
