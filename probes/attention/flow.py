"""One case: the flow, written once for every backend.

A backend supplies its named attention kernels (`AttentionKernel.call`: one forward + backward with its
faults on, timed its way) and the Backend its checks run on (torch: the device; JAX: torch on the
CPU, over the host copies its faults corrupt); `attention.run_kernels` adds the float64 reference
(`CaseReference`) and how mismatches are kept (`Keep`). `run_flow` owns the repeat rounds, the nonfinite / exact / reference /
repeat-determinism / cross-kernel checks, the consensus hash and the speed metrics.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ...results import Mismatch, Oracle
from ..backends import oracles as bo
from ..backends.base import Backend
from ..base import CaseOutcome
from .inputs import TENSORS, Inputs, Shape, Variant


@dataclass(slots=True)
class AttentionKernel:
    """One named attention implementation of a backend, and what the flow records of it."""

    name: str
    call: Callable[[], tuple[dict[str, Any], float, float | None]]
    """One forward + backward with the backend's faults on: ({out, dq, dk, dv}, forward seconds,
    backward seconds), or (tensors, seconds of the whole call, None) where the two are one program."""
    deterministic: bool = True
    """False: documented nondeterministic backward; its repeat spread is measured, not bits compared."""
    warm: dict[str, Any] | None = None
    """The first call's outputs (untimed: the library warms up), checked as round 0 like any other."""
    first: dict[str, Any] = field(default_factory=dict)
    t_fwd: list[float] = field(default_factory=list)
    t_bwd: list[float | None] = field(default_factory=list)
    spread: float = 0.0


class CaseReference(Protocol):
    """The float64 reference of one random case and its tolerance (attention.run_kernels gives it)."""

    def check(self, name: str, act: Any) -> Mismatch | None:
        """Oracle `fp64_reference` on output `name` of one call."""
        ...

    def spread(self, name: str, first: Any, act: Any) -> float:
        """How far a nondeterministic kernel's repeat moved, in units of the tolerance."""
        ...

    def cross(self, name: str, anchor: Any, other: Any, note: str) -> Mismatch | None:
        """Oracle `cross_backend` between two kernels' first rounds of output `name`."""
        ...


Keep = Callable[[CaseOutcome, Mismatch, "str | None", int], None]
"""Records a mismatch of kernel `name` (None: between kernels) found in round `r`."""


def run_flow(bk: Backend, kernels: list[AttentionKernel], inp: Inputs, shape: Shape, var: Variant, out: CaseOutcome, *,
             ref: CaseReference | None, keep: Keep, repeats: int, max_repeats: int,
             budget_s: float = 0.0) -> float:
    """Rounds of every kernel on the same inputs, each output checked as it comes; then the
    cross-kernel agreement, the hash and the metrics. Returns the seconds spent checking.

    `bk` holds the kernels' outputs (`inp.expected` too) and gives the deadline. Rounds: at least
    `repeats`, then more while `budget_s` lasts (without a deadline) up to `max_repeats`.
    """
    check_s = 0.0
    start = time.monotonic()
    r = 0
    while True:
        round_bad = False
        for kn in kernels:
            if kn.warm is not None:  # round 0 from the untimed first call: checked, never timed
                res, kn.warm = kn.warm, None
            else:
                res, t_f, t_b = kn.call()
                kn.t_fwd.append(t_f)
                kn.t_bwd.append(t_b)
            t0 = time.perf_counter()
            round_bad |= _check(bk, out, inp, ref, keep, kn, res, r)
            check_s += time.perf_counter() - t0
            del res
        r += 1
        out.repeats = r
        out.repeats_bad += round_bad
        if not all(kn.t_fwd for kn in kernels):
            continue  # at least one timed round after the warm one
        if r >= max_repeats:
            break
        if r >= repeats:
            deadline = bk.deadline
            past_deadline = deadline is not None and time.monotonic() >= deadline
            if (time.monotonic() - start >= budget_s and deadline is None) or past_deadline:
                break
    t0 = time.perf_counter()
    if ref is not None and len(kernels) >= 2:
        anchor = kernels[0]
        for kn in kernels[1:]:
            for name in TENSORS:
                m = ref.cross(name, anchor.first[name], kn.first[name], f"cross_backend={kn.name}_vs_{anchor.name}")
                if m is not None:
                    keep(out, m, None, 0)
    out.output_hash = _hash(bk, kernels)
    check_s += time.perf_counter() - t0
    _metrics(out, shape, var, kernels)
    return check_s


def _canon(bk: Backend, x: Any) -> Any:
    """-0 -> +0: the exact oracle's expected zeros have no sign (0 * negative is -0 in IEEE)."""
    return bk.where(x == 0, bk.zeros(tuple(x.shape), bk.dtype_name(x)), x)


def _check(bk: Backend, out: CaseOutcome, inp: Inputs, ref: CaseReference | None, keep: Keep, kn: AttentionKernel,
           res: dict[str, Any], r: int) -> bool:
    """Every oracle on one kernel's (out, dq, dk, dv) of round r; True when one fired."""
    bad = False
    for name in TENSORS:
        act = res[name]
        found: list[Mismatch | None] = [bo.nonfinite(bk, act, tensor=name)]
        if inp.expected:
            found.append(bo.compare_bits(bk, _canon(bk, inp.expected[name]), _canon(bk, act), tensor=name,
                                         oracle=Oracle.EXACT))
        elif ref is not None:
            found.append(ref.check(name, act))
        for m in filter(None, found):
            keep(out, m, kn.name, r)
            bad = True
        if r == 0:
            kn.first[name] = bk.copy(act)
        elif kn.deterministic or name == "out":
            rep = bo.compare_bits(bk, kn.first[name], act, tensor=name, oracle=Oracle.REPEAT)
            if rep is not None:
                out.nondeterministic = True
                keep(out, rep, kn.name, r)
        elif ref is not None:
            # documented nondeterministic: measure the spread, in units of the tolerance
            spread = ref.spread(name, kn.first[name], act)
            kn.spread = max(kn.spread, spread)
            if not spread <= 1.0:
                rep = bo.compare_bits(bk, kn.first[name], act, tensor=name, oracle=Oracle.REPEAT)
                if rep is not None:
                    out.nondeterministic = True
                    keep(out, replace(rep, note=f"spread_over_tol={spread:.3g} {rep.note}".strip()), kn.name, r)
    return bad


def _hash(bk: Backend, kernels: list[AttentionKernel]) -> str:
    """Bits of every deterministic output of every kernel (first round), for fleet consensus."""
    h = hashlib.sha256()
    for kn in kernels:
        for name in TENSORS:
            if kn.deterministic or name == "out":
                h.update(f"{kn.name}/{name}:{bo.array_hash(bk, kn.first[name])}".encode())
    return h.hexdigest()[:32]


def flops(shape: Shape, var: Variant) -> tuple[float, float]:
    """(forward, forward + backward) flops: 4 b h s^2 d forward, 2.5x that backward, halved when causal."""
    fwd_flops = 4.0 * shape.b * shape.hq * shape.s**2 * shape.d * (0.5 if var.causal else 1.0)
    return fwd_flops, 3.5 * fwd_flops  # backward = 2.5x forward


def _metrics(out: CaseOutcome, shape: Shape, var: Variant, kernels: list[AttentionKernel]) -> None:
    """Speed per kernel (suffix `_<name>` after the first): the standard attention count, 4 b h s^2 d
    forward, 2.5x that backward, halved when causal; per pass where the kernel timed them apart."""
    fwd_flops, total = flops(shape, var)
    for i, kn in enumerate(kernels):
        split = all(b is not None for b in kn.t_bwd)
        calls = [f + (b or 0.0) for f, b in zip(kn.t_fwd, kn.t_bwd, strict=True)]
        med, best = statistics.median(calls), min(calls)
        sfx = "" if i == 0 else f"_{kn.name}"
        out.metrics[f"tflops{sfx}"] = total / med / 1e12
        # the best call is what the chip can do (host noise only adds time): the fleet judges on it
        out.metrics[f"tflops_best{sfx}"] = total / best / 1e12
        out.metrics[f"time_ms{sfx}"] = med * 1e3
        if split:
            out.metrics[f"tflops_fwd{sfx}"] = fwd_flops / statistics.median(kn.t_fwd) / 1e12
            out.metrics[f"tflops_bwd{sfx}"] = 2.5 * fwd_flops / statistics.median(
                [b for b in kn.t_bwd if b is not None]) / 1e12
        if not kn.deterministic:
            out.metrics[f"repeat_spread{sfx}"] = kn.spread

