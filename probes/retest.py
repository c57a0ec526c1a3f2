"""Speed retest: a slow suspect and a peer of its fingerprint take turns on one kernel.

Purpose: confirm (or clear) a device the fleet suspects of being slow before it is called `slow`.
Requirement: the suspects and their peers, named by the judge (fleet.judge.speed) through the
options `retest_gemm` / `retest_copy` / `retest_attention` ("SUSPECT:PEER,...") and `retest_link` ("S>D:PS>PD,...": a
suspect directed link and a comparable peer link); every rank of the run joins the process group,
the others only keep the barriers. Cases `gemm`, `copy`, `link`, `attention`; `KERNEL/extended`
(gemm, copy, attention) is the judge's second stage for a first retest that was inconclusive: the same
turns, `extended_rounds` of them. `attention` (a causal attention forward and backward, in the
profile's `gemm_dtype`) confirms a device whose attention kernels alone are slow: a GEMM retest
cleared it.
Use case: a probe's ratio against its peers is noisy on a shared host (a model step spreads ±12%
run to run); an interleaved measurement on the lowest-noise kernel is not.

A GEMM retest runs in the dtype the suspect is slow in: case `gemm.DTYPE` (option `retest_gemm.DTYPE`),
DTYPE one of matmul's (tf32 and fp8 on CUDA: the matmul probe's own kernel, `backends.torch.Kernel`);
plain `gemm` runs the profile's `gemm_dtype`. A chip slow in one dtype only (its bf16 tensor-core
path) keeps its other GEMMs at full speed, and a retest in those would clear it.

Round i: the involved ranks time `calls` calls of the kernel one after another (ABBA order:
reversed every other round, so slow drift of the host cancels), each alone between barriers;
a turn keeps its best call. The judge compares suspect and peer round by round and calls the
suspect slow only when the interval of the paired ratio lies below the threshold.
Cost: rounds x involved ranks x calls kernel calls (about 2 s on CPU for one pair).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .backends.torch import Kernel
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register
from .cpu_load import HostBusy
from .matmul import ALL_DTYPES

KERNELS = ("gemm", "copy", "link", "attention")
EXTENDED = "extended"


def split_kernel(kernel: str) -> tuple[str, str]:
    """ "gemm.bfloat16" -> ("gemm", "bfloat16"); "gemm" -> ("gemm", "")."""
    base, _, dtype = kernel.partition(".")
    return base, dtype


def parse_case(case: str) -> tuple[str, str, str, str]:
    """ "gemm.bfloat16/extended" -> ("gemm.bfloat16", "gemm", "bfloat16", "extended"); InvalidConfig for a
    case that is not one."""
    kernel_name, _, stage = case.partition("/")
    base, dtype = split_kernel(kernel_name)
    if (base not in KERNELS or stage not in ("", EXTENDED) or (stage and base == "link")
            or (dtype and (base != "gemm" or dtype not in ALL_DTYPES))):
        raise InvalidConfig(f"unknown retest case {case!r}; known: {', '.join(KERNELS)}, gemm.DTYPE (DTYPE from "
                            f"{', '.join(ALL_DTYPES)}), KERNEL/{EXTENDED} for gemm and copy")
    return kernel_name, base, dtype, stage


def interleaved(rounds: int, involved: list[int], turn: Callable[[int], None], after: Callable[[], None]) -> None:
    """The rounds of turns: in round i each involved rank takes `turn(rank)`, in ABBA order (reversed every
    other round, so a slow drift of the host cancels in the paired ratios); `after` follows each turn."""
    for i in range(rounds):
        for r in (involved if i % 2 == 0 else involved[::-1]):
            turn(r)
            after()


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """ "1:2,3:2" -> [(1, 2), (3, 2)] (suspect, peer); InvalidConfig with a fix-it for anything else."""
    pairs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        a, sep, b = item.partition(":")
        if not sep or not a.isdigit() or not b.isdigit() or a == b:
            raise InvalidConfig(f"retest pairs: expected SUSPECT:PEER ranks like 1:2, got {item!r}")
        pairs.append((int(a), int(b)))
    return pairs


Link = tuple[int, int]


def link_key(link: Link) -> str:
    return f"{link[0]}>{link[1]}"


def parse_link_pairs(text: str) -> list[tuple[Link, Link]]:
    """ "0>1:2>3" -> [((0, 1), (2, 3))] (suspect link, peer link)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            a, b = (tuple(int(v) for v in half.split(">")) for half in item.split(":"))
            if len(a) != 2 or len(b) != 2 or a[0] == a[1] or b[0] == b[1]:
                raise ValueError
        except ValueError:
            raise InvalidConfig(f"retest links: expected SRC>DST:SRC>DST like 0>1:2>3, got {item!r}") from None
        out.append(((a[0], a[1]), (b[0], b[1])))
    return out


def _links(ctx: ProbeContext, cfg: RetestProbe.Config, pairs: list[tuple[Link, Link]]) -> CaseOutcome:
    """Directed links take turns: the source sends `link_mib` and waits for a one-element
    acknowledgement, `calls` times; it records the turn's fastest (a 1 MiB message takes about a
    millisecond on a CPU host, where one wake-up of a shared core costs several). Everyone else
    keeps the barrier."""
    import torch
    import torch.distributed as dist

    assert ctx.group is not None  # run_case checked it
    ctx.group()
    links = sorted({x for p in pairs for x in p})
    out = CaseOutcome(case="link", params={"pairs": [[link_key(a), link_key(b)] for a, b in pairs],
                                           "rounds": cfg.rounds, "calls": cfg.calls,
                                           "kernel": f"send {cfg.link_mib} MiB"})
    mine = [x for x in links if ctx.rank in x]
    buf = torch.zeros(cfg.link_mib * 2**20 // 4, device=ctx.device) if mine else None
    ack = torch.zeros(1, device=ctx.device)
    turns: dict[str, list[float]] = {link_key(x): [] for x in links if x[0] == ctx.rank}

    def turn(x: Link, timed: bool) -> None:
        if ctx.rank == x[0]:
            assert buf is not None
            best = math.inf
            with ctx.under_test():  # wall time: a slow link keeps its ends waiting, not computing
                for _ in range(cfg.calls):
                    ctx.timer.sync()
                    t0 = time.perf_counter()
                    dist.send(buf, x[1])
                    dist.recv(ack, x[1])
                    ctx.timer.sync()
                    best = min(best, time.perf_counter() - t0)
            if timed:
                turns[link_key(x)].append(best)
        elif ctx.rank == x[1]:
            assert buf is not None
            with ctx.under_test():
                for _ in range(cfg.calls):
                    dist.recv(buf, x[0])
                    dist.send(ack, x[0])

    for x in links:  # connections, buffers: never a turn's time
        turn(x, timed=False)
        dist.barrier()
    for i in range(cfg.rounds):
        for x in (links if i % 2 == 0 else links[::-1]):
            turn(x, timed=True)
            dist.barrier()
    if turns:
        out.params["link_turn_s"] = turns
    return out


@register("retest")
class RetestProbe(Probe):
    order = 200
    default = False
    collective = True
    min_devices = 2
    jax = "jax_retest"  # gemm turns on a single host's JAX devices
    speed_metric: ClassVar[str] = ""  # its times are read pairwise by the judge, not against the fleet

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        rounds: int = 12
        """Interleaved rounds (each involved rank takes one turn per round)."""
        extended_rounds: int = 36
        """Rounds of the second stage (`KERNEL/extended`), for a first retest that was inconclusive."""
        calls: int = 3
        """Kernel calls per turn; the turn keeps its best."""
        gemm_n: int = 1024
        """GEMM size (n x n x n)."""
        gemm_dtype: str = "float32"
        """The dtype of a plain `gemm` case."""
        gemm_n_by_dtype: dict[str, int] = field(default_factory=dict)
        """GEMM size for a `gemm.DTYPE` case where `gemm_n` would take too long (a CPU's float16)."""
        copy_mib: int = 64
        """Device-to-device copy size, far above the last-level cache."""
        link_mib: int = 16
        """Payload of one link turn (a send and a one-element acknowledgement)."""
        attention_bhsd: list[int] = field(default_factory=lambda: [1, 8, 512, 64])
        """Attention turn's (batch, heads, sequence, head dim)."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("retest", profile, device_kind)
        cfg = self.Config(**p)
        if cfg.rounds < 4 or cfg.extended_rounds < 4 or cfg.calls < 1:
            raise InvalidConfig("retest: rounds and extended_rounds must be >= 4 and calls >= 1 "
                                "(profiles/retest.toml)")
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return list(KERNELS)

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        import torch.distributed as dist

        kernel_name, base, dtype, stage = parse_case(case)
        if ctx.group is None:
            raise InvalidConfig("retest is collective: it needs ctx.group (run it through the fleet worker)")
        if case == "link":
            return _links(ctx, cfg, parse_link_pairs(ctx.options.get("retest_link", "")))
        pairs = parse_pairs(ctx.options.get(f"retest_{kernel_name}", ""))
        rounds = cfg.extended_rounds if stage else cfg.rounds
        involved = sorted({r for p in pairs for r in p})
        ctx.group()
        out = CaseOutcome(case=case, params={"pairs": [list(p) for p in pairs], "rounds": rounds,
                                             "calls": cfg.calls})
        kernel = _kernel(ctx, cfg, base, dtype) if ctx.rank in involved else None
        out.params.update(kernel[1] if kernel else {})
        times: list[float] = []
        if kernel is not None:
            with ctx.under_test():
                for _ in range(2):  # allocations, library start-up, clocks ramping: never a turn's time
                    kernel[0]()
        # a CPU device shares its host with other work: how busy the host, and its own cores, were in its turns
        host = HostBusy() if ctx.device_kind == "cpu" else contextlib.nullcontext()

        def turn(r: int) -> None:
            if r == ctx.rank and kernel is not None:
                with ctx.under_test(), host:
                    times.append(min(ctx.timer.time(kernel[0])[1] for _ in range(cfg.calls)))

        interleaved(rounds, involved, turn, dist.barrier)
        keep_turns(out, times, host)
        return out


def keep_turns(out: CaseOutcome, times: list[float], host: Any) -> None:
    """A rank's turn times (and, on a CPU device, how busy its host was in them) into its outcome."""
    if times:
        out.params["turn_s"] = times
        out.metrics["turn_s_best"] = min(times)
        if isinstance(host, HostBusy):
            out.params.update({k: v for k, v in (("host_busy_share", host.share),
                                                 ("foreign_share", host.foreign_share)) if v is not None})


def _kernel(ctx: ProbeContext, cfg: RetestProbe.Config, base: str, dtype: str) -> tuple[Any, dict[str, Any]]:
    """The timed callable and what it is (recorded with the result)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    if base == "gemm":
        dtype = dtype or cfg.gemm_dtype
        n = cfg.gemm_n_by_dtype.get(dtype, cfg.gemm_n)
        k = Kernel.for_dtype(dtype, ctx.device)  # matmul's: tf32's setting, fp8's scaled GEMM and layout
        a, b = k.prepare(torch.rand(n, n, generator=g).to(ctx.device), torch.rand(n, n, generator=g).to(ctx.device))

        def gemm() -> Any:
            with k.settings():
                return k(a, b)

        return gemm, {"kernel": f"{dtype} GEMM n={n}", "dtype": dtype}
    if base == "attention":
        import torch.nn.functional as F  # noqa: N812

        dt = getattr(torch, cfg.gemm_dtype)
        shape = tuple(cfg.attention_bhsd)
        q, key, val = (torch.rand(shape, generator=g).to(ctx.device, dt).requires_grad_() for _ in range(3))
        grad = torch.rand(shape, generator=g).to(ctx.device, dt)

        def attention() -> Any:
            q.grad = key.grad = val.grad = None
            out = F.scaled_dot_product_attention(q, key, val, is_causal=True)
            out.backward(grad)
            return out

        return attention, {"kernel": f"{cfg.gemm_dtype} causal attention forward+backward bhsd={list(shape)}",
                           "dtype": cfg.gemm_dtype}
    n = cfg.copy_mib * 2**20 // 4
    src = torch.rand(n, generator=g).to(ctx.device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), {"kernel": f"copy {cfg.copy_mib} MiB"}
