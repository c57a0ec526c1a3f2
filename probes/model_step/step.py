"""`model_step`: K training steps on one device, run `repeats` times (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...results import Oracle, Verdict
from ..base import CaseOutcome, InvalidConfig, Probe, ProbeContext, register
from ..keeping import KeepPolicy, Stamp, keep
from .checks import (
    checksum,
    fp64_reference,
    nonfinite,
    reference_mismatch,
    repeat_mismatch,
    speed_metrics,
    trace_hash,
)
from .config import StepConfig, model_configs, model_seed, step_config

KEEP = KeepPolicy(stamp=Stamp.FIRST_REPEAT)
"""The first mismatch per oracle, with the repeat it came from."""


@dataclass(slots=True)
class Run:
    """One run of the K steps: its loss trace, final-state checksum and per-step times."""

    losses: list[float]
    state: int
    step_s: list[float]



@register("model_step")
class ModelStepProbe(Probe):
    order = 40
    Config = StepConfig

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> StepConfig:
        return step_config("model_step", profile, device_kind)

    def cases(self, cfg: StepConfig) -> list[str]:
        return list(cfg.precisions)

    def run_case(self, ctx: ProbeContext, cfg: StepConfig, case: str) -> CaseOutcome:
        if case not in cfg.precisions:
            raise InvalidConfig(f"unknown model_step case {case!r}; known: {', '.join(cfg.precisions)}")
        from ...model.train import determinism

        mc, tc = model_configs(cfg, case)
        seed = model_seed(ctx)
        out = CaseOutcome(case=case, params={"preset": cfg.preset, "steps": cfg.steps, "batch_size": cfg.batch_size,
                                             "precision": case, "seq_len": mc.seq_len, "d_model": mc.d_model,
                                             "n_layers": mc.n_layers, "reference": cfg.reference,
                                             "determinism": determinism(ctx.device.type)})
        ref = fp64_reference(cfg, mc, tc, seed, shards=1, ctx=ctx)
        tokens = cfg.batch_size * mc.seq_len
        repeat_runs(ctx, cfg.repeats, lambda: _train_once(ctx, mc, tc, seed, cfg.steps), out,
                    ref=ref, tol=cfg.tol[case])
        runs_s = out.params.pop("_step_s")
        speed_metrics(out, mc.flops_per_token(), tokens, runs_s, runs_s, ctx, case)
        return out


def _train_once(ctx: ProbeContext, mc: Any, tc: Any, seed: int, steps: int) -> Run:
    """K steps from the seed's init on ctx.device; each step timed alone, inside under_test."""
    from ...model import data
    from ...model.train import Trainer

    tr = Trainer(mc, tc, seed=seed, device=ctx.device)
    batches = [data.batch(mc, seed, s, batch_size=tc.batch_size, device=ctx.device) for s in range(steps)]
    losses, times = [], []
    for x, y in batches:
        with ctx.timer.exclusive(), ctx.under_test():
            loss, dt = ctx.timer.time(lambda x=x, y=y: tr.step(x, y))
        losses.append(loss)
        times.append(dt)
    state = int(checksum(tr.state_tensors()))
    return Run(losses=[float(v) for v in losses], state=state, step_s=times)


def repeat_runs(ctx: ProbeContext, repeats: int, once: Callable[[], Run], out: CaseOutcome, *,
                ref: list[float] | None, tol: float) -> None:
    """Run `once` `repeats` times; fill the oracles' findings, the hash and the step times into `out`."""
    first: Run | None = None
    step_s: list[float] = []
    hashes: list[str] = []
    for r in range(repeats):
        run = once()
        hashes.append(trace_hash(run.losses, run.state))
        step_s.extend(run.step_s)
        found = [m for m in (nonfinite(run.losses, "loss"),
                             reference_mismatch(run.losses, ref, tol, "loss") if ref is not None else None) if m]
        if first is None:
            first = run
        else:
            rep = repeat_mismatch(first.losses, run.losses, first.state, run.state, "loss")
            if rep is not None:
                out.nondeterministic = True
                found.append(rep)
        for m in found:
            keep(out, m, KEEP, repeat=r)
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
        out.output_hash = hashes[0]
    elif out.nondeterministic and not out.repeats_bad:
        out.repeat_hashes = hashes  # no oracle can say which repeat is right; the peers can
