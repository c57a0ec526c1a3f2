"""Model-step probes: train the reference GPT (chipcheck.model) for K steps, as a check.

Catches: corruption that only shows in the composition of kernels (forward, backward, optimizer,
gradient all-reduce), nondeterministic chips, data-parallel replicas that drift apart, and slow
chips (throughput measured here, judged by the fleet).

`model_step` (per device, one case per precision): K steps run `repeats` times from the same seed.
- repeat-determinism: the loss trace and the hash of the final state (parameters and AdamW
  moments) must be bitwise identical across repeats;
- fleet consensus: that hash (with the loss trace) must match every device of one fingerprint;
- fp64 reference: the same K steps in float64 on the CPU; each loss must lie within
  `tol * |loss64|` (tol per precision, docs/model.md), which catches systematic error;
- non-finite losses.

`model_dp` (collective, all ranks): K data-parallel steps (bucketed gradient all-reduce).
- gradient cross-check (every `verify_every` steps): rank r also replays the shard of rank r+1,
  so every shard's local gradient is computed twice, by two chips, before anything is reduced.
  Their checksums must match bitwise; when they do not, both chips recompute the shard and the
  odd one out is named (a chip that disagrees with itself; or, if both are self-consistent, the
  one farther from a float64 recomputation). The named chip's gradient is replaced by the good
  copy before the all-reduce, so one bad chip does not corrupt the others' training;
- replica check (every `replica_every` steps and after the last): a checksum of every rank's parameters, all-gathered; data-parallel
  replicas (and the replicated parameters of a tensor-parallel pair) must hold identical bits;
  the minority is named and re-synchronised from the majority;
- the global loss trace against the fp64 reference (not attributable to one rank).
The `tp2` case splits attention and MLP over rank pairs (tensor parallel) with data parallelism
over the pairs; it runs the replica check and the fp64 reference (not the gradient cross-check).

User steps: `register_step` turns a team's own model step into a probe with the `model_step`
oracles (repeat-determinism, consensus, non-finite). Modules named in the `chipcheck.steps`
entry-point group, or in CHIPCHECK_STEPS (comma-separated), are imported when this module is.

Cost: the checks are a checksum per step and one replayed forward/backward per `verify_every`
steps (benchmarks/bench_model_step.py: overhead ratio vs the bare loop).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from .. import generator as g
from ..results import Blame, Mismatch, Oracle, Verdict
from . import faults, oracles
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register

faults.CALL_TIME_PROBES.update({"model_step", "model_dp"})

# Peak dense throughput (TFLOP/s) per precision, from vendor spec sheets, by device-name substring.
SPEC_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class StepConfig:
    """Shared knobs of both model probes (from probes/profiles/model_step.toml or model_dp.toml)."""

    preset: str = "tiny"
    """Model size (chipcheck.model.GPTConfig.preset): tiny, bench or gpu."""
    steps: int = 4
    """Training steps per case (K)."""
    batch_size: int = 8
    """Sequences per (data-parallel) rank per step."""
    precisions: tuple[str, ...] = ("fp32",)
    """One case per precision: fp32, bf16."""
    repeats: int = 2
    """model_step: runs of the K steps (repeat-determinism needs two)."""
    reference: str = "cpu"
    """Where the fp64 reference runs: cpu, device (big models on GPUs) or off."""
    tol: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "bf16": 2e-2})
    """Relative tolerance of each loss against the fp64 reference, per precision."""
    verify_every: int = 1
    """model_dp: cross-check every N-th step's gradients (0: never)."""
    replica_every: int = 1
    """model_dp: replica check every N-th step and after the last (divergence is sticky: a replica
    that drifted stays different, so a later check still names it)."""
    tp_case: bool = False
    """model_dp: add the tensor-parallel case tp2/fp32."""
    lr: float = 1e-3
    """AdamW learning rate."""


def _step_config(probe: str, profile: str, device_kind: str) -> StepConfig:
    from ..model.config import PRECISIONS, ConfigError, GPTConfig

    p = profile_table(probe, profile, device_kind)
    known = {f for f in StepConfig.__dataclass_fields__}
    unknown = set(p) - known
    if unknown:
        raise InvalidConfig(f"{probe}: unknown profile keys {sorted(unknown)}; known: {sorted(known)}")
    kw: dict[str, Any] = dict(p)
    if "precisions" in kw:
        kw["precisions"] = tuple(kw["precisions"])
    if "tol" in kw:
        kw["tol"] = {**StepConfig().tol, **{k: float(v) for k, v in kw["tol"].items()}}
    cfg = StepConfig(**kw)
    try:
        GPTConfig.preset(cfg.preset)
    except ConfigError as e:
        raise InvalidConfig(f"{probe}: {e}") from None
    bad = [x for x in cfg.precisions if x not in PRECISIONS or x == "fp64"]
    if bad or not cfg.precisions:
        raise InvalidConfig(f"{probe}: precisions {list(cfg.precisions)}: use fp32 and/or bf16")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.repeats < 1 or cfg.replica_every < 1 or cfg.verify_every < 0:
        raise InvalidConfig(f"{probe}: steps, batch_size, repeats and replica_every must be >= 1, "
                            "verify_every >= 0")
    if cfg.reference not in ("cpu", "device", "off"):
        raise InvalidConfig(f"{probe}: reference={cfg.reference!r}; use cpu, device or off")
    return cfg


def _configs(cfg: StepConfig, precision: str, tp: int = 1) -> tuple[Any, Any]:
    from ..model.config import GPTConfig, TrainConfig

    return GPTConfig.preset(cfg.preset), TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, precision=precision,
                                                     tp=tp)


def _seed(ctx: ProbeContext) -> int:
    # One seed for every case of both probes: fp32, bf16, dp and tp2 start from the same weights and data.
    return ctx.seed ^ g.stream_id("model")


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


def _trace_hash(losses: list[float], state: int) -> str:
    """Consensus hash: the loss trace's float32 bits and the state checksum."""
    h = hashlib.sha256(struct.pack(f"<{len(losses)}f", *losses) + struct.pack("<q", state))
    return h.hexdigest()[:32]


# ---- shared oracles ----------------------------------------------------------------------


def _reference_mismatch(losses: list[float], ref: list[float], tol: float, tensor: str) -> Mismatch | None:
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


def _nonfinite(losses: list[float], tensor: str) -> Mismatch | None:
    import torch

    return oracles.nonfinite(torch.tensor(losses, dtype=torch.float32), tensor=tensor)


def _repeat_mismatch(first: list[float], again: list[float], h0: int, h1: int, tensor: str) -> Mismatch | None:
    import torch

    m = oracles.compare_bits(torch.tensor(first, dtype=torch.float32), torch.tensor(again, dtype=torch.float32),
                             tensor=tensor, oracle=Oracle.REPEAT)
    if m is None and h0 == h1:
        return None
    if m is None:  # same losses, different final state: the last step's update differed
        return Mismatch(oracle=Oracle.REPEAT, tensor="state", bad_elements=1, total_elements=1,
                        note=f"state checksum {h0} vs {h1} with identical loss traces")
    return replace(m, note=f"first_bad_step={m.first_indices[0][0]} state_equal={h0 == h1}")


def _speed(out: CaseOutcome, flops_per_token: float, tokens: int, step_s: list[float], compute_s: list[float],
           ctx: ProbeContext, precision: str, global_tokens: int | None = None) -> None:
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


# ---- model_step: one device ----------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    losses: list[float]
    state: int
    step_s: list[float]


@register("model_step")
class ModelStepProbe(Probe):
    order = 40
    Config = StepConfig

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> StepConfig:
        return _step_config("model_step", profile, device_kind)

    def cases(self, cfg: StepConfig) -> list[str]:
        return list(cfg.precisions)

    def run_case(self, ctx: ProbeContext, cfg: StepConfig, case: str) -> CaseOutcome:
        if case not in cfg.precisions:
            raise InvalidConfig(f"unknown model_step case {case!r}; known: {', '.join(cfg.precisions)}")
        mc, tc = _configs(cfg, case)
        seed = _seed(ctx)
        out = CaseOutcome(case=case, params={"preset": cfg.preset, "steps": cfg.steps, "batch_size": cfg.batch_size,
                                             "precision": case, "seq_len": mc.seq_len, "d_model": mc.d_model,
                                             "n_layers": mc.n_layers, "reference": cfg.reference})
        ref = _reference(cfg, mc, tc, seed, shards=1, ctx=ctx)
        tokens = cfg.batch_size * mc.seq_len
        _repeat_runs(ctx, cfg.repeats, lambda: _train_once(ctx, mc, tc, seed, cfg.steps), out,
                     ref=ref, tol=cfg.tol[case])
        runs_s = out.params.pop("_step_s")
        _speed(out, mc.flops_per_token(), tokens, runs_s, runs_s, ctx, case)
        return out


def _reference(cfg: StepConfig, mc: Any, tc: Any, seed: int, *, shards: int, ctx: ProbeContext) -> list[float] | None:
    from ..model.train import reference_losses

    if cfg.reference == "off":
        return None
    dev = "cpu" if cfg.reference == "cpu" else ctx.device
    return reference_losses(mc, tc, seed=seed, steps=cfg.steps, shards=shards, device=dev)


def _train_once(ctx: ProbeContext, mc: Any, tc: Any, seed: int, steps: int) -> _Run:
    """K steps from the seed's init on ctx.device; each step timed alone, inside under_test."""
    from ..model import data
    from ..model.train import Trainer

    tr = Trainer(mc, tc, seed=seed, device=ctx.device)
    batches = [data.batch(mc, seed, s, batch_size=tc.batch_size, device=ctx.device) for s in range(steps)]
    losses, times = [], []
    for x, y in batches:
        with ctx.timer.exclusive(), ctx.under_test():
            loss, dt = ctx.timer.time(lambda x=x, y=y: tr.step(x, y))
        losses.append(loss)
        times.append(dt)
    state = int(checksum(tr.state_tensors()))
    return _Run(losses=[float(v) for v in losses], state=state, step_s=times)


def _repeat_runs(ctx: ProbeContext, repeats: int, once: Callable[[], _Run], out: CaseOutcome, *,
                 ref: list[float] | None, tol: float) -> None:
    """Run `once` `repeats` times; fill the oracles' findings, the hash and the step times into `out`."""
    first: _Run | None = None
    step_s: list[float] = []
    for r in range(repeats):
        run = once()
        step_s.extend(run.step_s)
        found = [m for m in (_nonfinite(run.losses, "loss"),
                             _reference_mismatch(run.losses, ref, tol, "loss") if ref is not None else None) if m]
        if first is None:
            first = run
        else:
            rep = _repeat_mismatch(first.losses, run.losses, first.state, run.state, "loss")
            if rep is not None:
                out.nondeterministic = True
                found.append(rep)
        for m in found:
            _keep(out, m, r)
        out.repeats_bad += bool(found and any(m.oracle is not Oracle.REPEAT for m in found))
        out.repeats = r + 1
    assert first is not None
    out.params["_step_s"] = step_s
    out.metrics["loss_first"] = first.losses[0]
    out.metrics["loss_last"] = first.losses[-1]
    if ref is not None:
        out.metrics["ref_max_rel_err"] = max(abs(a - e) / abs(e) for a, e in zip(first.losses, ref, strict=True))
    if out.verdict is Verdict.PASS:
        # Only a device whose own oracles passed votes in fleet consensus (a caught one must not
        # leave its peers without a majority).
        out.output_hash = _trace_hash(first.losses, first.state)


def _keep(out: CaseOutcome, m: Mismatch, repeat: int) -> None:
    """First mismatch per oracle, with the repeat it came from."""
    if not any(old.oracle == m.oracle for old in out.mismatches):
        out.mismatches.append(replace(m, note=(m.note + f" first_repeat={repeat}").strip()))


# ---- model_dp: all ranks -----------------------------------------------------------------


@register("model_dp")
class ModelDPProbe(Probe):
    order = 41
    collective = True
    min_devices = 2
    Config = StepConfig

    def __init__(self) -> None:
        self._grids: dict[int, Any] = {}

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> StepConfig:
        return _step_config("model_dp", profile, device_kind)

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
            from ..model.train import make_parallel

            self._grids[tp] = make_parallel(tp)  # collective: every rank reaches it in the same case
        return run_dp(ctx, cfg, case, precision, self._grids[tp])


@dataclass(slots=True)
class _Named:
    """Why this rank was named in one step (a cross-check dispute or a replica divergence)."""

    step: int
    mismatch: Mismatch


def run_dp(ctx: ProbeContext, cfg: StepConfig, case: str, precision: str, par: Any, *,
           checks: bool = True) -> CaseOutcome:
    """K data-parallel steps with the cross-check and replica check (`checks=False`: the bare loop,
    for the overhead benchmark). Every rank of the default group must call it together."""
    import torch
    import torch.distributed as dist

    from ..model import data
    from ..model.train import Trainer

    mc, tc = _configs(cfg, precision, par.tp_size)
    seed = _seed(ctx)
    tr = Trainer(mc, tc, seed=seed, device=ctx.device, par=par)
    out = CaseOutcome(case=case, params={"preset": cfg.preset, "steps": cfg.steps, "batch_size": cfg.batch_size,
                                         "precision": precision, "dp": par.dp_size, "tp": par.tp_size,
                                         "verify_every": cfg.verify_every if par.tp_size == 1 else 0,
                                         "reference": cfg.reference})
    named: list[_Named] = []
    stats = {"disputes": 0, "resynced": 0}
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
            own = _cross_check(ctx, tr, par, s, own, chk, shard_data=lambda j, s=s: data.batch(
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
            _replica_check(tr, par, s, named, stats)
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
    for m in filter(None, [_nonfinite(trace_l, "loss")]):
        out.mismatches.append(replace(m, note="global loss (all ranks see it: not attributable to one rank)",
                                      blame=Blame.SHARED, group=everyone))
    ref = _reference(cfg, mc, tc, seed, shards=par.dp_size, ctx=ctx)
    if ref is not None:
        m = _reference_mismatch(trace_l, ref, cfg.tol[precision], "loss")
        if m is not None:
            out.mismatches.append(replace(m, note=m.note + " global loss (not attributable to one rank)",
                                          blame=Blame.SHARED, group=everyone))
        out.metrics["ref_max_rel_err"] = max(abs(a - e) / abs(e) for a, e in zip(trace_l, ref, strict=True))
    out.repeats = 1
    out.repeats_bad = 1 if out.mismatches else 0
    out.metrics.update({"loss_first": trace_l[0], "loss_last": trace_l[-1], "disputes": float(stats["disputes"]),
                        "resynced": float(stats["resynced"]), "check_ms": 1e3 * check_s / cfg.steps})
    tokens = cfg.batch_size * mc.seq_len
    # Each TP rank does 1/tp of the block FLOPs (the replicated embeddings and head are small at tp=2).
    _speed(out, mc.flops_per_token() / par.tp_size, tokens, step_s, compute_s, ctx, precision,
           global_tokens=tokens * par.dp_size)
    state = checksum(tr.state_tensors())
    if par.tp_size > 1:  # a TP rank holds half the matrices: hash the pair's state, identical on both
        state = checksum(_all_gather(state.reshape(1), par.tp_group, par.tp_size))
    if not out.mismatches:
        out.output_hash = _trace_hash(trace_l, int(state))
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


def _all_gather(x: Any, group: Any, size: int) -> list[Any]:
    import torch.distributed as dist

    parts = [x.new_empty(x.shape) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _cross_check(ctx: ProbeContext, tr: Any, par: Any, step: int, own: list[Any], chk: list[Any], *,
                 shard_data: Callable[[int], tuple[Any, Any]], named: list[_Named],
                 stats: dict[str, int]) -> list[Any]:
    """Compare every shard's gradient as computed by its owner and by its checker (the rank before
    it); resolve disagreements. Returns this rank's contribution to the all-reduce."""
    import torch

    mine = torch.stack([checksum(own), checksum(chk)])
    table = torch.stack(_all_gather(mine, par.dp_group, par.dp_size)).cpu().tolist()
    n = par.dp_size
    disputes = [(j, (j - 1) % n) for j in range(n) if table[j][0] != table[(j - 1) % n][1]]
    for owner, checker in disputes:
        stats["disputes"] += 1
        own = _resolve(ctx, tr, par, step, owner, checker, own, chk, shard_data(owner), named)
    return own


def _resolve(ctx: ProbeContext, tr: Any, par: Any, step: int, owner: int, checker: int, own: list[Any],
             chk: list[Any], batch: tuple[Any, Any], named: list[_Named]) -> list[Any]:
    """Owner and checker computed shard `owner`'s gradient with different bits: find the bad chip.

    Both recompute it. A chip whose first result is the odd one out of {own first, own rerun,
    peer's} is named; if both are self-consistent (a persistent difference) the one farther from
    a float64 recomputation is named. The good copy replaces a named owner's contribution.
    """
    import torch
    import torch.distributed as dist

    me = par.dp_rank
    sizes = [t.numel() for t in own]
    # Both first results, on every rank of the group (for the verdict and the diagnosis).
    a = torch.cat(own) if me == owner else torch.empty(sum(sizes), dtype=own[0].dtype, device=own[0].device)
    b = torch.cat(chk) if me == checker else torch.empty_like(a)
    dist.broadcast(a, src=par.dp_ranks[owner], group=par.dp_group)
    dist.broadcast(b, src=par.dp_ranks[checker], group=par.dp_group)
    rerun = torch.zeros((), dtype=torch.int64, device=a.device)
    if me in (owner, checker):
        with ctx.under_test():
            tr.forward_backward(*batch)
        rerun = checksum([torch.cat(tr.pack_grads())])
    reruns = [int(v) for v in _all_gather(rerun, par.dp_group, par.dp_size)]
    ca, cb = int(checksum([a])), int(checksum([b]))
    a2, b2 = reruns[owner], reruns[checker]
    bad: set[int] = set()
    if a2 == cb and b2 == cb:
        bad, why = {owner}, "its gradient differs from the checker's copy and from its own recomputation"
    elif b2 == ca and a2 == ca:
        bad, why = {checker}, "its replay differs from the owner's gradient and from its own recomputation"
    elif a2 == ca and b2 == cb:
        err = _fp64_error(tr, par, batch, a if me == owner else b) if me in (owner, checker) else 0.0
        errs = [float(v) for v in _all_gather(torch.tensor([err], dtype=torch.float64), par.dp_group, par.dp_size)]
        errs = [math.inf if math.isnan(e) else e for e in errs]  # a NaN gradient is the farthest of all
        worst = max(errs[owner], errs[checker])
        bad = {r for r in (owner, checker) if errs[r] == worst}
        why = (f"both chips repeat their own result; its error against float64 is {worst:.3g} "
               f"(owner {errs[owner]:.3g}, checker {errs[checker]:.3g})")
    else:
        bad = {r for r, first, again in ((owner, ca, a2), (checker, cb, b2)) if first != again}
        why = "it does not reproduce its own result"
    if owner in bad and checker not in bad:
        good, wrong = b, a
        if me == owner:
            own = list(b.split(sizes))  # the checker's copy stands in for the bad one
    else:
        good, wrong = a, b
    if me in bad:
        role = "owner" if me == owner else "checker"
        m = oracles.compare_bits(good, wrong, tensor=f"grad(shard {owner})", oracle=Oracle.REPLICA)
        note = (f"data-parallel gradient cross-check: rank {par.dp_ranks[me]} ({role} of shard {owner}; peer rank "
                f"{par.dp_ranks[checker if me == owner else owner]}): {why}")
        if m is None:
            m = Mismatch(oracle=Oracle.REPLICA, tensor=f"grad(shard {owner})", bad_elements=0,
                         total_elements=a.numel())
        named.append(_Named(step=step, mismatch=replace(m, note=note)))
    return own


def _fp64_error(tr: Any, par: Any, batch: tuple[Any, Any], flat: Any) -> float:
    """Max relative error of a flat gradient against a float64 recomputation on the CPU."""
    import torch

    from ..model.train import Trainer

    ref = Trainer(tr.model_cfg, replace(tr.cfg, precision="fp64", tp=1), seed=0, device="cpu")
    with torch.no_grad():
        for p64, p in zip(ref.params, tr.params, strict=True):
            p64.copy_(p.detach().double().cpu())
    ref.forward_backward(batch[0].cpu(), batch[1].cpu())
    g64 = torch.cat(ref.pack_grads())
    return float((flat.double().cpu() - g64).abs().max() / g64.abs().max().clamp_min(1e-300))


def _replica_check(tr: Any, par: Any, step: int, named: list[_Named], stats: dict[str, int]) -> None:
    """All-gather parameter checksums; name ranks that differ from their replicas' majority and
    (without tensor parallelism) copy the majority's state to them."""
    import torch
    import torch.distributed as dist

    repl = checksum(p for _, p in tr.model.replicated())
    shard = checksum(p for _, p in tr.model.sharded())
    table = torch.stack(_all_gather(torch.stack([repl, shard]), None, par.world)).cpu().tolist()
    # replicated parameters: one class over all ranks; split ones: one class per tp rank
    classes = [(list(range(par.world)), 0, "replicated parameters")]
    classes += [(list(range(t, par.world, par.tp_size)), 1, "parameters") for t in range(par.tp_size)]
    diverged: set[int] = set()
    resync = True
    for ranks, col, what in classes:
        votes: dict[int, list[int]] = {}
        for r in ranks:
            votes.setdefault(table[r][col], []).append(r)
        if len(votes) == 1:
            continue
        top = max(votes.values(), key=len)
        majority = len(top) * 2 > len(ranks)
        for r in ranks:
            if majority and r in top:
                continue
            diverged.add(r)
            if r == par.rank:
                why = (f"data-parallel replica check: {what} of rank {r} differ from "
                       + (f"the majority ({len(top)} of {len(ranks)} ranks, e.g. rank {top[0]})" if majority
                          else f"its replicas with no majority ({len(votes)} distinct among ranks {ranks})"))
                # Without a strict majority the replicas say that one of them is bad, not which.
                named.append(_Named(step=step, mismatch=Mismatch(
                    oracle=Oracle.REPLICA, tensor=what.split()[0] if col == 0 else "parameters",
                    bad_elements=1, total_elements=1, note=why,
                    blame=Blame.OWN if majority else Blame.SHARED, group=[] if majority else list(ranks))))
        resync = resync and majority
    if diverged and resync and par.tp_size == 1:
        # Re-synchronise the minority from the lowest majority rank, so one bad chip does not
        # make the rest of the run diverge (AdamW's step counters live on the host and agree).
        src = min(set(range(par.world)) - diverged)
        for t in tr.state_tensors():
            if t.device == tr.device:
                dist.broadcast(t.data, src=src)
        stats["resynced"] += len(diverged)


# ---- user steps --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UserStep:
    """What a user's builder returns: their model's step, and how to read its state."""

    step: Callable[[int], Any]
    """Runs training step i (forward, loss, backward, optimizer) and returns the loss (a tensor)."""
    state: Callable[[], Iterable[Any]]
    """The tensors whose bits define the state after a step (parameters, optimizer moments)."""
    tokens_per_step: int = 0
    """Tokens one step consumes (for tokens_per_s; 0: not reported)."""
    flops_per_step: float = 0.0
    """FLOPs of one step (for tflops and the fleet's slowness judgement; 0: not reported)."""


def register_step(name: str, *, steps: int = 8, repeats: int = 2, order: int = 45,
                  default: bool = False) -> Callable[[Callable[[Any, int], UserStep]], Callable[[Any, int], UserStep]]:
    """Register a team's own training step as probe `name`.

    Decorate a builder `build(device, seed) -> UserStep`; it must build everything from `seed`
    (weights, data) so every device computes the same bits. The probe runs `steps` steps
    `repeats` times inside the fault injector, and checks repeat-determinism (loss trace and
    state bits), non-finite losses and, through the fleet, consensus among devices of one
    fingerprint; `flops_per_step` gives tflops/tflops_best for the slowness judgement.

        @register_step("our_llm_step", steps=4)
        def build(device, seed):
            model, opt, batches = make_everything(device, seed)
            def step(i):
                loss = model(batches[i]).loss
                loss.backward(); opt.step(); opt.zero_grad()
                return loss.detach()
            return UserStep(step=step, state=lambda: list(model.parameters()))
    """
    if steps < 1 or repeats < 1:
        raise InvalidConfig(f"register_step({name!r}): steps and repeats must be >= 1")

    def deco(build: Callable[[Any, int], UserStep]) -> Callable[[Any, int], UserStep]:
        @dataclass(frozen=True, slots=True, kw_only=True)
        class Config:
            steps: int = 8
            """Steps per run."""
            repeats: int = 2
            """Runs compared bit for bit."""

        class _UserStepProbe(Probe):
            __doc__ = f"User training step {name!r} ({build.__module__}.{build.__qualname__})."

            def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Any:
                return Config(steps=steps, repeats=repeats)

            def cases(self, cfg: Any) -> list[str]:
                return ["step"]

            def run_case(self, ctx: ProbeContext, cfg: Any, case: str) -> CaseOutcome:
                seed = ctx.seed ^ g.stream_id(name)
                built: list[UserStep] = []

                def once() -> _Run:
                    us = build(ctx.device, seed)
                    built[:] = [us]
                    losses, times = [], []
                    for i in range(cfg.steps):
                        with ctx.timer.exclusive(), ctx.under_test():
                            loss, dt = ctx.timer.time(lambda i=i: us.step(i))
                        losses.append(float(loss))
                        times.append(dt)
                    return _Run(losses=losses, state=int(checksum(us.state())), step_s=times)

                out = CaseOutcome(case=case, params={"steps": cfg.steps, "builder": f"{build.__module__}."
                                                     f"{build.__qualname__}"})
                _repeat_runs(ctx, cfg.repeats, once, out, ref=None, tol=0.0)
                times = out.params.pop("_step_s")
                us = built[0]
                if us.flops_per_step > 0:
                    per_token = us.flops_per_step / max(1, us.tokens_per_step)
                    _speed(out, per_token, max(1, us.tokens_per_step), times, times, ctx, "fp32")
                    if not us.tokens_per_step:
                        del out.metrics["tokens_per_s"]
                else:
                    steady = times[1:] if len(times) > 1 else times
                    out.metrics["step_ms"] = 1e3 * statistics.median(steady)
                return out

        _UserStepProbe.__name__ = f"UserStep_{name}"
        _UserStepProbe.order = order
        _UserStepProbe.default = default
        register(name)(_UserStepProbe)
        faults.CALL_TIME_PROBES.add(name)
        return build

    return deco


def _load_user_steps() -> None:
    """Import the modules that register user steps: the `chipcheck.steps` entry points and
    CHIPCHECK_STEPS (comma-separated module names; the workers inherit the environment)."""
    import importlib
    import os
    from importlib import metadata

    for ep in metadata.entry_points(group="chipcheck.steps"):
        ep.load()
    for mod in filter(None, (m.strip() for m in os.environ.get("CHIPCHECK_STEPS", "").split(","))):
        importlib.import_module(mod)


_load_user_steps()
