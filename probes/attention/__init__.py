"""Attention probe: `scaled_dot_product_attention` forward and backward, checked like the matmul.

Catches: silent corruption in the fused attention kernels (flash, memory-efficient, cuDNN, the
CPU flash kernel) and in the GEMMs / softmax of the math path, in the output and in the three
gradients; nondeterministic chips; throttled chips (TFLOP/s, judged by the fleet).

One case per (dtype, head dim, variant); inside a case every SDPA backend the device offers is
selected explicitly (`torch.nn.attention.sdpa_kernel`) and run on the same inputs, in rounds
(one call of each backend per round, forward then backward, each timed). `params["backends"]`
records which ran, `params["skipped"]` which could not and why (e.g. flash takes no mask).

Variants: `exact` (causal, grouped-query), `full` (non-causal, one KV head per Q head), `causal`
(grouped-query), `mask` (additive float mask with -inf padding, grouped-query).

Oracles:
- `exact`: one-hot attention. Q/K encode key codes in base-4 digits so that the raw score is
  C - ||digits(t) - digits(j)||^2: exactly C (a power of two) at the target key t(i) <= i and at
  least 1 lower elsewhere; with scale 256 every other probability underflows to exactly 0 and the
  target's is exp(0) = 1. So out = V[t(i)], dq = dk = 0 and dv = sums of small-integer dO rows,
  all exact in fp32/bf16/fp16 whatever the summation order: any differing bit is an error
  (signed zeros are folded: -0 == +0). Assumes the kernel's exp(0) is exactly 1.
- random cases (full-mantissa uniform inputs): an fp64 reference of the formula
  (softmax(QK^T s + mask) V and its gradients) on sampled (batch, KV-head) groups under the
  dtype-aware tolerance `sigmas * u_eff * (|ref| + mag)`, where mag is the formula evaluated with
  every term made positive (P|V|, P(|dP| + sum|dO||O|)|K|, ...: componentwise error analysis, so
  rows with few keys and the cancellation in dS and in D = rowsum(dO O) are covered) and u_eff = sqrt(u^2 (1 + s/256) + (s + d) 2^-48)
  (u: the dtype's unit roundoff; s/256: per-block roundings; (s + d) 2^-48: fp32 accumulation);
  agreement between backends on every element (twice that tolerance); non-finite values;
  repeat-determinism (bitwise) for backends that promise it, and for backends documented
  nondeterministic (CUDA flash / efficient backward use atomics) the repeat spread measured
  against the tolerance, flagged only beyond it; a hash of the deterministic outputs for fleet
  consensus (CaseOutcome.output_hash).

Speed: the standard attention count, 4 b h s^2 d forward, 2.5x that backward, halved when causal;
`tflops` (median fwd+bwd call) and `tflops_best` (best call) of the first backend that ran.
Cost: the reference is O(G g s^2 d) in fp64 for G sampled groups; the other checks are O(b h s d).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ... import generator as g
from ...results import Mismatch, Oracle
from ..backends.torch import TorchBackend
from ..base import CaseOutcome, InvalidConfig, Probe, ProbeContext, Unsupported, profile_table, register
from ..keeping import KeepPolicy, Stamp, Tally, keep
from .flow import AttentionKernel, CaseReference, Keep, flops, run_flow
from .inputs import (
    EXACT_SCALE,
    EXACT_WINDOW,
    TENSORS,
    Inputs,
    Shape,
    Variant,
    exact_inputs,
    exact_on,
    random_inputs,
    random_on,
)
from .kernels import BACKENDS, NONDETERMINISTIC_BACKWARD, OFFERED, NoKernel, call, first_call
from .reference import Reference, reference, tolerance_mismatch, u_eff

__all__ = ["BACKENDS", "DTYPES", "EXACT_SCALE", "EXACT_WINDOW", "NONDETERMINISTIC_BACKWARD", "OFFERED", "TENSORS",
           "VARIANTS", "AttentionKernel", "AttentionProbe", "CaseReference", "Inputs", "Keep", "Reference", "Shape",
           "Variant", "call", "exact_inputs", "exact_on", "plan", "random_inputs", "random_on", "reference",
           "run_flow", "run_kernels", "tolerance_mismatch", "u_eff", "validate"]

DTYPES = ("float32", "bfloat16", "float16")

VARIANTS = {
    "exact": Variant(causal=True, mask=False, gqa=True, exact=True),
    "full": Variant(causal=False, mask=False, gqa=False),
    "causal": Variant(causal=True, mask=False, gqa=True),
    "mask": Variant(causal=False, mask=True, gqa=True),
}


@register("attention")
class AttentionProbe(Probe):
    order = 20
    jax = "jax_attention"
    speed_kernel = "attention"  # a chip slow in attention alone keeps full-speed GEMMs: retest on attention

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        head_dims: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"float32": (64,)})
        """Head dims per dtype (the dtypes run are its keys)."""
        seq: dict[str, int] = field(default_factory=lambda: {"float32": 64})
        """Sequence length (queries = keys) per dtype."""
        batch: int = 1
        """Batch size."""
        q_heads: int = 4
        """Query heads."""
        kv_heads: int = 2
        """Key/value heads of the grouped-query variants (divides q_heads)."""
        variants: tuple[str, ...] = tuple(VARIANTS)
        """Variants run per (dtype, head dim)."""
        backends: tuple[str, ...] = ()
        """Backends tried, in order (empty: every backend the device kind offers)."""
        repeats: int = 2
        """Minimum rounds per case (repeat-determinism needs two or more)."""
        max_repeats: int = 2
        """Upper bound on rounds per case when a time budget is set."""
        budget_s: float = 0.0
        """Seconds a case may keep repeating after `repeats` (0: exactly `repeats`)."""
        ref_groups: int = 0
        """(batch, KV-head) groups recomputed in fp64 by the reference oracle (0: all)."""
        sigmas: float = 8.0
        """Width of the tolerance, in units of u_eff * (|ref| + magnitude) (measured worst: 1.4)."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("attention", profile, device_kind)
        kind = "cuda" if device_kind in ("cuda", "rocm") else "cpu"
        cfg = self.Config(
            head_dims={d: tuple(int(x) for x in v) for d, v in p["head_dims"].items()},
            seq={d: int(v) for d, v in p["seq"].items()},
            batch=int(p["batch"]), q_heads=int(p["q_heads"]), kv_heads=int(p["kv_heads"]),
            variants=tuple(p.get("variants", tuple(VARIANTS))),
            backends=tuple(p.get("backends", OFFERED[kind])),
            repeats=int(p["repeats"]), max_repeats=int(p["max_repeats"]), budget_s=float(p["budget_s"]),
            ref_groups=int(p.get("ref_groups", 0)), sigmas=float(p.get("sigmas", 8.0)))
        validate(cfg)
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return [f"{dt}/d{d}/{v}" for dt, dims in cfg.head_dims.items() for d in dims for v in cfg.variants]

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        dtype_name, shape, var = plan(cfg, case)
        seed = ctx.seed ^ g.stream_id(case)
        inp = (exact_inputs if var.exact else random_inputs)(shape, var, _dtype(dtype_name), seed, ctx.device)
        return _run(ctx, cfg, case, shape, var, inp)


def validate(cfg: AttentionProbe.Config) -> None:
    """Fail early, with a fix-it message, on a config the probe cannot run."""
    for dt, dims in cfg.head_dims.items():
        if dt not in DTYPES:
            raise InvalidConfig(f"attention: unknown dtype {dt!r}; known: {', '.join(DTYPES)}")
        if dt not in cfg.seq or cfg.seq[dt] < 2:
            raise InvalidConfig(f"attention: give seq.{dt} >= 2 in probes/profiles/attention.toml")
        for d in dims:
            if d < 16 or d % 8:
                raise InvalidConfig(f"attention: head dim {d} for {dt} must be a multiple of 8 >= 16")
    for v in cfg.variants:
        if v not in VARIANTS:
            raise InvalidConfig(f"attention: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    for b in cfg.backends:
        if b not in BACKENDS:
            raise InvalidConfig(f"attention: unknown backend {b!r}; known: {', '.join(BACKENDS)}")
    if cfg.kv_heads < 1 or cfg.q_heads % cfg.kv_heads:
        raise InvalidConfig(f"attention: kv_heads={cfg.kv_heads} must divide q_heads={cfg.q_heads}")
    if cfg.repeats < 2 or cfg.max_repeats < cfg.repeats:
        raise InvalidConfig("attention: need 2 <= repeats <= max_repeats (repeat-determinism compares rounds)")


def plan(cfg: AttentionProbe.Config, case: str) -> tuple[str, Shape, Variant]:
    """Case `<dtype>/d<head dim>/<variant>` of `cfg`: its dtype name, shape and variant."""
    parts = case.split("/")
    if len(parts) == 3 and parts[0] in cfg.head_dims and parts[1].startswith("d") and parts[1][1:].isdigit():
        d = int(parts[1][1:])
        if d in cfg.head_dims[parts[0]] and parts[2] in VARIANTS:
            var = VARIANTS[parts[2]]
            kv = cfg.kv_heads if var.gqa else cfg.q_heads
            return parts[0], Shape(b=cfg.batch, hq=cfg.q_heads, hkv=kv, s=cfg.seq[parts[0]], d=d), var
    raise InvalidConfig(f"unknown attention case {case!r}; e.g. bfloat16/d128/causal")


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


# ---- the torch case: every SDPA backend as a kernel ----------------------------------------


@dataclass(slots=True)
class _TorchReference:
    """`Reference` (sampled groups, on the device) as the flow's CaseReference."""

    ref: Reference
    sigmas: float
    g_size: int

    def check(self, name: str, act: Any) -> Mismatch | None:
        ref = self.ref
        return tolerance_mismatch(ref.ref[name], ref.gather(name, act, self.g_size), ref.tolerance(name, self.sigmas),
                                  tensor=name, oracle=Oracle.REFERENCE, note=f"sigmas={self.sigmas:g}",
                                  to_index=lambda ix: ref.index(name, ix, self.g_size))

    def spread(self, name: str, first: Any, act: Any) -> float:
        ref = self.ref
        diff = (act.double() - first.double()).abs()
        return float((diff / (self.sigmas * ref.u_eff * ref.row_envelope(name) + ref.tiny)).max())

    def cross(self, name: str, anchor: Any, other: Any, note: str) -> Mismatch | None:
        ref = self.ref
        # min(|a|, |b|) and the reference's row envelope: a corrupted huge value must not widen
        # its own tolerance
        scale = anchor.double().abs().minimum(other.double().abs()) + ref.row_envelope(name)
        tol = 2 * self.sigmas * ref.u_eff * scale + 2 * ref.tiny
        return tolerance_mismatch(anchor.double(), other, tol, tensor=name, oracle=Oracle.CROSS_BACKEND,
                                  to_index=lambda ix: ix, note=note)


KEEP = KeepPolicy(by_tensor=True, by_backend=True, histogram=True, tally=Tally.ROUNDS, stamp=Stamp.FIRST_REPEAT)
"""The first mismatch per (oracle, tensor, backend), with the round it came from; later rounds add to
its bit histogram and count of bad rounds, so the repeat rate stays visible."""


def _torch_keep(out: CaseOutcome, m: Mismatch, kernel: str | None, r: int) -> None:
    """attention.Keep: a kernel's mismatch names its backend (None: a comparison between two)."""
    keep(out, m if kernel is None else _note(m, f"backend={kernel}"), KEEP, repeat=r, backend=kernel)


def _run(ctx: ProbeContext, cfg: AttentionProbe.Config, case: str, shape: Shape, var: Variant,
         inp: Inputs) -> CaseOutcome:
    kind = "cuda" if ctx.device.type == "cuda" else ctx.device.type
    ran: list[AttentionKernel] = []
    skipped: dict[str, str] = {}
    with ctx.timer.exclusive():
        for name in cfg.backends:
            kernel = _sdpa_call(ctx, name, inp, var, shape)
            try:
                warm = first_call(kernel)
            except NoKernel as e:
                skipped[name] = str(e)
                continue
            ran.append(AttentionKernel(name, kernel, (kind, name) not in NONDETERMINISTIC_BACKWARD, warm=warm))
        ctx.timer.sync()
    return run_kernels(TorchBackend.of(ctx), cfg, case, shape, var, inp, ran, skipped, ctx.seed ^ g.stream_id(case))


def run_kernels(bk: TorchBackend, cfg: AttentionProbe.Config, case: str, shape: Shape, var: Variant, inp: Inputs,
                ran: list[AttentionKernel], skipped: dict[str, str], seed: int) -> CaseOutcome:
    """One case around a backend's attention kernels, the same on every path: its params, the
    float64 reference and its tolerance, `run_flow`'s rounds and checks, the speed metrics.

    `inp` and the kernels' outputs are torch tensors on `bk`'s device (the JAX path: host copies on
    the CPU); `skipped` names the kernels that could not run, and why; `seed` is the case's.
    """
    out = CaseOutcome(case=case, params={
        "b": shape.b, "hq": shape.hq, "hkv": shape.hkv, "s": shape.s, "d": shape.d,
        "dtype": str(inp.q.dtype).removeprefix("torch."), "causal": var.causal, "mask": var.mask,
        "gqa": shape.hkv != shape.hq, "mode": "exact" if var.exact else "random",
        "scale": inp.scale or 1.0 / math.sqrt(shape.d)})
    out.params["backends"] = [kn.name for kn in ran]
    out.params["skipped"] = skipped
    if not ran:
        raise Unsupported(f"attention {case}: no attention kernel can run it here ({skipped})")
    ref = None if var.exact else _TorchReference(reference(inp, var, shape, cfg.ref_groups, seed), cfg.sigmas,
                                                 shape.group)
    check_s = run_flow(bk, ran, inp, shape, var, out, ref=ref, keep=_torch_keep,
                       repeats=cfg.repeats, max_repeats=cfg.max_repeats, budget_s=cfg.budget_s)
    out.params["timed_backend"] = ran[0].name
    out.params["flops_fwd_bwd"] = flops(shape, var)[1]
    out.metrics["check_ms"] = 1e3 * check_s / max(1, out.repeats * len(ran))
    return out


def _sdpa_call(ctx: ProbeContext, name: str, inp: Inputs, var: Variant,
               shape: Shape) -> Callable[[], tuple[dict[str, Any], float, float | None]]:
    """One SDPA backend's fwd + bwd under the harness's host lock and faults, each pass timed."""

    def run() -> tuple[dict[str, Any], float, float | None]:
        with ctx.timer.exclusive(), ctx.under_test():
            return call(name, inp, var, shape, ctx.timer)

    return run


def _note(m: Mismatch, tag: str) -> Mismatch:
    return m if tag in m.note else replace(m, note=f"{tag} {m.note}".strip())

