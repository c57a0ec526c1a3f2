"""`model_dp`: K data-parallel (or tensor-parallel pair) steps on all ranks, with the gradient
cross-check and the replica check of dp_checks.py (see the package docstring)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ...results import Blame
from ..base import CaseOutcome, InvalidConfig, Probe, ProbeContext, register
from .checks import checksum, fp64_reference, nonfinite, reference_mismatch, speed_metrics, trace_hash
from .config import StepConfig, model_configs, model_seed, step_config
from .dp_checks import Named, all_gather, cross_check, replica_check


@register("model_dp")
class ModelDPProbe(Probe):
    order = 41
    collective = True
    min_devices = 2
    Config = StepConfig

    def __init__(self) -> None:
        self._grids: dict[int, Any] = {}

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> StepConfig:
        return step_config("model_dp", profile, device_kind)

    def cases(self, cfg: StepConfig) -> list[str]:
        return [f"dp/{p}" for p in cfg.precisions] + (["tp2/fp32"] if cfg.tp_case else [])

    def run_case(self, ctx: ProbeContext, cfg: StepConfig, case: str) -> CaseOutcome:
        if case not in self.cases(cfg):
            raise InvalidConfig(f"unknown model_dp case {case!r}; known: {', '.join(self.cases(cfg))}")
        if ctx.group is None:
            raise InvalidConfig("model_dp is collective: it needs ctx.group (run it through the fleet worker)")
        ctx.group()
        kind, _, precision = case.partition("/")
        # An odd world cannot be split into pairs: the tp2 case then runs with tp=1 (recorded in params).
        tp = 2 if kind == "tp2" and ctx.world_size % 2 == 0 else 1
        if tp not in self._grids:
            from ...model.train import make_parallel

            self._grids[tp] = make_parallel(tp)  # collective: every rank reaches it in the same case
        return run_dp(ctx, cfg, case, precision, self._grids[tp])


def run_dp(ctx: ProbeContext, cfg: StepConfig, case: str, precision: str, par: Any, *,
           checks: bool = True) -> CaseOutcome:
    """K data-parallel steps with the cross-check and replica check (`checks=False`: the bare loop,
    for the overhead benchmark). Every rank of the default group must call it together."""
    import torch
    import torch.distributed as dist

    from ...model import data
    from ...model.train import Trainer, determinism

    mc, tc = model_configs(cfg, precision, par.tp_size)
    seed = model_seed(ctx)
    tr = Trainer(mc, tc, seed=seed, device=ctx.device, par=par)
    out = CaseOutcome(case=case, params={"preset": cfg.preset, "steps": cfg.steps, "batch_size": cfg.batch_size,
                                         "precision": precision, "dp": par.dp_size, "tp": par.tp_size,
                                         "verify_every": cfg.verify_every if par.tp_size == 1 else 0,
                                         "reference": cfg.reference,
                                         "determinism": determinism(ctx.device.type)})
    named: list[Named] = []
    stats = {"disputes": 0, "resynced": 0, "diverged_disputes": 0}
    shard = {j: [data.batch(mc, seed, s, batch_size=cfg.batch_size, shard=j, shards=par.dp_size, device=ctx.device)
                 for s in range(cfg.steps)] for j in {par.dp_rank, (par.dp_rank + 1) % par.dp_size}}
    losses, step_s, compute_s, check_s = [], [], [], 0.0
    # Tensor-parallel ranks exchange activations inside forward/backward, so they cannot take turns.
    turns = ctx.device.type == "cpu" and par.tp_size == 1 and _cores_shared(par)
    for s in range(cfg.steps):
        verify = checks and par.tp_size == 1 and cfg.verify_every > 0 and s % cfg.verify_every == 0
        chk = None
        if verify:  # replay the next rank's shard first, so .grad ends up holding our own shard's
            t0 = time.perf_counter()
            with ctx.under_test():
                tr.forward_backward(*shard[(par.dp_rank + 1) % par.dp_size][s])
            chk = tr.pack_grads()
            check_s += time.perf_counter() - t0
        loss, dt = _take_turns(ctx, par, turns, lambda s=s: _fb(ctx, tr, *shard[par.dp_rank][s]))
        compute_s.append(dt)
        own = tr.pack_grads()
        if chk is not None:
            t0 = time.perf_counter()
            own = cross_check(ctx, tr, par, s, own, chk, shard_data=lambda j, s=s: data.batch(
                mc, seed, s, batch_size=cfg.batch_size, shard=j, shards=par.dp_size, device=ctx.device),
                named=named, stats=stats)
            check_s += time.perf_counter() - t0

        def rest(own: list[Any] = own) -> None:
            tr.reduce(own)
            tr.unpack_grads(own)
            with ctx.under_test():
                tr.optimizer_step()

        # The step's time: this rank's own compute plus reduce and update (not the checks).
        step_s.append(dt + ctx.timer.time(rest)[1])
        losses.append(loss)
        if checks and (s % cfg.replica_every == 0 or s == cfg.steps - 1):
            t0 = time.perf_counter()
            replica_check(tr, par, s, named, stats)
            check_s += time.perf_counter() - t0
    # The global loss: the mean of the shards' losses (one all-reduce for the whole trace).
    trace = torch.stack(losses).float()
    if par.dp_size > 1:
        dist.all_reduce(trace, group=par.dp_group)
        trace /= par.dp_size
    trace_l = [float(v) for v in trace.cpu()]
    if not checks:
        out.metrics["step_ms"] = 1e3 * statistics.median(step_s)
        return out
    for n in named:
        out.mismatches.append(replace(n.mismatch, note=(n.mismatch.note + f" step={n.step}").strip()))
    # The global loss is the same value on every rank: evidence that some rank is bad, not which.
    everyone = list(range(par.world))
    for m in filter(None, [nonfinite(trace_l, "loss")]):
        out.mismatches.append(replace(m, note="global loss (all ranks see it: not attributable to one rank)",
                                      blame=Blame.SHARED, group=everyone))
    ref = fp64_reference(cfg, mc, tc, seed, shards=par.dp_size, ctx=ctx)
    if ref is not None:
        m = reference_mismatch(trace_l, ref, cfg.tol[precision], "loss")
        if m is not None:
            out.mismatches.append(replace(m, note=m.note + " global loss (not attributable to one rank)",
                                          blame=Blame.SHARED, group=everyone))
        out.metrics["ref_max_rel_err"] = max(abs(a - e) / abs(e) for a, e in zip(trace_l, ref, strict=True))
    out.repeats = 1
    out.repeats_bad = 1 if out.mismatches else 0
    out.metrics.update({"loss_first": trace_l[0], "loss_last": trace_l[-1], "disputes": float(stats["disputes"]),
                        "resynced": float(stats["resynced"]), "diverged_disputes": float(stats["diverged_disputes"]),
                        "check_ms": 1e3 * check_s / cfg.steps})
    tokens = cfg.batch_size * mc.seq_len
    # Each TP rank does 1/tp of the block FLOPs (the replicated embeddings and head are small at tp=2).
    speed_metrics(out, mc.flops_per_token() / par.tp_size, tokens, step_s, compute_s, ctx, precision,
                  global_tokens=tokens * par.dp_size)
    state = checksum(tr.state_tensors())
    if par.tp_size > 1:  # a TP rank holds half the matrices: hash the pair's state, identical on both
        state = checksum(all_gather(state.reshape(1), par.tp_group, par.tp_size))
    if not out.mismatches:
        out.output_hash = trace_hash(trace_l, int(state))
    return out


def _fb(ctx: ProbeContext, tr: Any, x: Any, y: Any) -> Any:
    with ctx.under_test():
        return tr.forward_backward(x, y)


_SHARED: dict[int, bool] = {}


def _cores_shared(par: Any) -> bool:
    """Whether two ranks' CPU affinities overlap (virtual CPU devices on too few cores). Collective."""
    import os

    import torch.distributed as dist

    if par.world not in _SHARED:
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        every: list[Any] = [None] * par.world
        dist.all_gather_object(every, mine)
        seen: set[int] = set()
        shared = False
        for cores in every:
            shared = shared or bool(seen & set(cores)) or not cores
            seen |= set(cores)
        _SHARED[par.world] = shared
    return _SHARED[par.world]


def _take_turns(ctx: ProbeContext, par: Any, turns: bool, fn: Callable[[], Any]) -> tuple[Any, float]:
    """Time `fn` (this rank's forward/backward). Virtual CPU devices that share cores compute one
    at a time (in rank order, between barriers), so no rank is timed while a neighbour computes;
    devices of their own compute at once. Only the local compute is timed: in lockstep data
    parallelism a slow rank makes every rank's step slow, but only its own compute."""
    import torch.distributed as dist

    if not turns:
        return ctx.timer.time(fn)
    result: tuple[Any, float] | None = None
    for r in range(par.world):
        if r == par.rank:
            result = ctx.timer.time(fn)
        dist.barrier()
    assert result is not None
    return result
