"""The model probes' shared configuration: StepConfig, its loading from the TOML profiles, and the
model and training configs and seed every case of both probes starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ... import generator as g
from ..base import InvalidConfig, ProbeContext, profile_table


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


def step_config(probe: str, profile: str, device_kind: str) -> StepConfig:
    """The StepConfig of `probe` from its profile table, validated (InvalidConfig with a fix-it)."""
    from ...model.config import PRECISIONS, ConfigError, GPTConfig

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


def model_configs(cfg: StepConfig, precision: str, tp: int = 1) -> tuple[Any, Any]:
    """The reference GPT's model and training configs for one case."""
    from ...model.config import GPTConfig, TrainConfig

    return GPTConfig.preset(cfg.preset), TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, precision=precision,
                                                     tp=tp)


def model_seed(ctx: ProbeContext) -> int:
    """The seed of the model's weights and data, derived from the run's seed."""
    # One seed for every case of both probes: fp32, bf16, dp and tp2 start from the same weights and data.
    return ctx.seed ^ g.stream_id("model")
