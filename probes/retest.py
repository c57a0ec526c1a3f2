"""Speed retest: a slow suspect and a peer of its fingerprint take turns on one kernel.

Purpose: confirm (or clear) a device the fleet suspects of being slow before it is called `slow`.
Requirement: the suspects and their peers, named by the judge (fleet.judge.speed) through the
options `retest_gemm` / `retest_copy` ("SUSPECT:PEER,..."); every rank of the run joins the
process group, the others only keep the barriers.
Use case: a probe's ratio against its peers is noisy on a shared host (a model step spreads ±12%
run to run); an interleaved measurement on the lowest-noise kernel is not.

Round i: the involved ranks time `calls` calls of the kernel one after another (ABBA order:
reversed every other round, so slow drift of the host cancels), each alone between barriers;
a turn keeps its best call. The judge compares suspect and peer round by round and calls the
suspect slow only when the interval of the paired ratio lies below the threshold.
Cost: rounds x involved ranks x calls kernel calls (about 2 s on CPU for one pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register

KERNELS = ("gemm", "copy")


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """ "1:2,3:2" -> [(1, 2), (3, 2)] (suspect, peer); InvalidConfig with a fix-it for anything else."""
    pairs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        a, sep, b = item.partition(":")
        if not sep or not a.isdigit() or not b.isdigit() or a == b:
            raise InvalidConfig(f"retest pairs: expected SUSPECT:PEER ranks like 1:2, got {item!r}")
        pairs.append((int(a), int(b)))
    return pairs


def format_pairs(pairs: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}:{b}" for a, b in pairs)


@register("retest")
class RetestProbe(Probe):
    order = 200
    default = False
    collective = True
    min_devices = 2
    speed_metric: ClassVar[str] = ""  # its times are read pairwise by the judge, not against the fleet

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        rounds: int = 12
        """Interleaved rounds (each involved rank takes one turn per round)."""
        calls: int = 3
        """Kernel calls per turn; the turn keeps its best."""
        gemm_n: int = 1024
        """GEMM size (n x n x n)."""
        gemm_dtype: str = "float32"
        copy_mib: int = 64
        """Device-to-device copy size, far above the last-level cache."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("retest", profile, device_kind)
        cfg = self.Config(**p)
        if cfg.rounds < 4 or cfg.calls < 1:
            raise InvalidConfig("retest: rounds must be >= 4 and calls >= 1 (profiles/retest.toml)")
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return list(KERNELS)

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        import torch.distributed as dist

        if case not in KERNELS:
            raise InvalidConfig(f"unknown retest case {case!r}; known: {', '.join(KERNELS)}")
        if ctx.group is None:
            raise InvalidConfig("retest is collective: it needs ctx.group (run it through the fleet worker)")
        pairs = parse_pairs(ctx.options.get(f"retest_{case}", ""))
        involved = sorted({r for p in pairs for r in p})
        ctx.group()
        out = CaseOutcome(case=case, params={"pairs": [list(p) for p in pairs], "rounds": cfg.rounds,
                                             "calls": cfg.calls})
        kernel = _kernel(ctx, cfg, case) if ctx.rank in involved else None
        out.params.update(kernel[1] if kernel else {})
        times: list[float] = []
        if kernel is not None:
            with ctx.under_test():
                for _ in range(2):  # allocations, library start-up, clocks ramping: never a turn's time
                    kernel[0]()
        for i in range(cfg.rounds):
            order = involved if i % 2 == 0 else involved[::-1]
            for r in order:
                if r == ctx.rank and kernel is not None:
                    with ctx.under_test():
                        times.append(min(ctx.timer.time(kernel[0])[1] for _ in range(cfg.calls)))
                dist.barrier()
        if times:
            out.params["turn_s"] = times
            out.metrics["turn_s_best"] = min(times)
        return out


def _kernel(ctx: ProbeContext, cfg: RetestProbe.Config, case: str) -> tuple[Any, dict[str, Any]]:
    """The timed callable and what it is (recorded with the result)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    if case == "gemm":
        dt = getattr(torch, cfg.gemm_dtype)
        a = torch.rand(cfg.gemm_n, cfg.gemm_n, generator=g).to(ctx.device, dt)
        b = torch.rand(cfg.gemm_n, cfg.gemm_n, generator=g).to(ctx.device, dt)
        return (lambda: torch.mm(a, b)), {"kernel": f"{cfg.gemm_dtype} GEMM n={cfg.gemm_n}"}
    n = cfg.copy_mib * 2**20 // 4
    src = torch.rand(n, generator=g).to(ctx.device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), {"kernel": f"copy {cfg.copy_mib} MiB"}
