"""User steps: `register_step` turns a team's own training step into a probe with the `model_step`
oracles (see the package docstring); `load_user_steps` imports the modules that register them."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ... import generator as g
from .. import faults
from ..base import CaseOutcome, InvalidConfig, Probe, ProbeContext, register
from .checks import checksum, speed_metrics
from .step import Run, repeat_runs


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

                from ...model.train import determinism, strict_determinism

                def once() -> Run:
                    us = build(ctx.device, seed)
                    built[:] = [us]
                    losses, times = [], []
                    for i in range(cfg.steps):
                        # strict on CUDA, as for the GPT: repeats are compared bit for bit
                        with ctx.timer.exclusive(), ctx.under_test(), strict_determinism(ctx.device.type):
                            try:
                                loss, dt = ctx.timer.time(lambda i=i: us.step(i))
                            except RuntimeError as e:
                                if "deterministic implementation" not in str(e):
                                    raise
                                raise InvalidConfig(
                                    f"user step {name!r}: {str(e).splitlines()[0]} Its repeats cannot be compared "
                                    "bit for bit on this device; replace that op or layer with a deterministic "
                                    "one, or leave this step out of runs here (--probes).") from None
                        losses.append(float(loss))
                        times.append(dt)
                    return Run(losses=losses, state=int(checksum(us.state())), step_s=times)

                out = CaseOutcome(case=case, params={"steps": cfg.steps, "builder": f"{build.__module__}."
                                                     f"{build.__qualname__}",
                                                     "determinism": determinism(ctx.device.type)})
                repeat_runs(ctx, cfg.repeats, once, out, ref=None, tol=0.0)
                times = out.params.pop("_step_s")
                us = built[0]
                if us.flops_per_step > 0:
                    per_token = us.flops_per_step / max(1, us.tokens_per_step)
                    speed_metrics(out, per_token, max(1, us.tokens_per_step), times, times, ctx, "fp32")
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


def load_user_steps() -> None:
    """Import the modules that register user steps: the `chipcheck.steps` entry points and
    CHIPCHECK_STEPS (comma-separated module names; the workers inherit the environment)."""
    import importlib
    import os
    from importlib import metadata

    for ep in metadata.entry_points(group="chipcheck.steps"):
        ep.load()
    for mod in filter(None, (m.strip() for m in os.environ.get("CHIPCHECK_STEPS", "").split(","))):
        importlib.import_module(mod)
