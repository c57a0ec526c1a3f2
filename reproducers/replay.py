"""Replay a capture op by op on a device and compare every op with a reference.

Differential, teacher-forced replay: the suspect device replays the whole log (so every op sees the
inputs it saw during the step); each op is also run on the reference from *the suspect's own inputs*
(upcast to float64 for `cpu64`), so rounding does not accumulate and the first op whose output
leaves the dtype-aware tolerance is the culprit, not one of its consumers.

References: `cpu64` (float64 on the CPU, tolerance per dtype), a device (`cpu`, `cuda:1`: same dtype,
bitwise), or `rank:N` (the device rank N's capture ran on, bitwise). Collectives are not recomputed
on one rank: their recorded post-wait outputs are substituted, and when every rank's capture is
present an all-reduce is checked against the exact host-side sum of every rank's inputs.

Simulation hook (testing reproducers on a CPU, which has no real bug): `inject=SPEC` applies a
probes/faults.py spec to the suspect's kernels. A fault's `after`/`count` number the matching calls
of the captured step, and are kept per original op: a shrunk case that keeps op #i sees the fault
exactly when op #i saw it during the step.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..probes import faults as faultmod
from ..probes.backends import backend_of, oracles
from ..probes.backends.base import INT_BY_WIDTH
from . import format as fmt
from . import fused
from . import settings as st
from .reduction import exact_result
from .terms import CANCELLING, cancelling_terms

# Relative tolerance vs float64 per output dtype, scaled by (|ref| + rms(ref)) (for `SUMS`, by the op on
# |inputs| where that is larger): loose enough for any correct kernel's rounding (summation order, fused
# ops, TF32), far below a flipped exponent or high bit.
RTOL = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 1e-1, torch.float16: 2e-2}
_MANTISSA = {torch.float32: 24, torch.float64: 53, torch.bfloat16: 8, torch.float16: 11}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INV = pow(1_000_003, -1, 2**31)
# Outputs with undefined contents: never compared.
_UNDEFINED = fmt.ALLOCATIONS | {"resize_"}
# Ops whose every output element is a sum of products of input elements: a sum that cancels to near
# zero (centred activations, softmax gradients, a convolution's bias gradient under BatchNorm, one
# token's gradient rows) still carries the rounding of its large terms, so the tolerance also scales
# with the op run on the inputs' absolute values (the classic bound; each output of the backward ops
# listed here is likewise a sum of products of their inputs).
SUMS = frozenset({"sum", "mean", "nansum", "cumsum", "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "mv",
                  "addmv", "dot", "vdot", "linear", "_grouped_mm", "einsum", "convolution", "_convolution",
                  "convolution_backward", "embedding_dense_backward", "_adaptive_avg_pool2d", "avg_pool2d",
                  "index_add", "scatter_add"})


class ReplayError(RuntimeError):
    """The capture cannot be replayed here (unknown op, missing blob, bad reference)."""


class CaptureDefect(ReplayError):
    """An op that crashes on its recorded inputs on the suspect AND on the reference: the capture did
    not record what the op consumed (a view of a storage resized behind the recorder's back, ...).
    That is a defect of the capture, never the chip failure being reproduced (exit 2, the op named)."""

    def __init__(self, rank: int, index: int, op: str, message: str):
        self.rank, self.index, self.op = rank, index, op
        super().__init__(f"capture defect: rank {rank} op #{index} {op} crashes on its recorded inputs on every "
                         f"device (suspect and reference): {message}; the capture did not record what this op "
                         "consumed, so no reproducer is made from it")


@dataclass(frozen=True, slots=True, kw_only=True)
class Metric:
    """How one output differs from the reference."""

    cls: str
    """wrong (beyond tolerance), nonfinite (NaN/Inf where the reference is finite), crash."""
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: float = 0.0
    bad: int = 0
    total: int = 0
    bad_indices: list[list[int]] = field(default_factory=list)
    flipped_bits: dict[int, int] = field(default_factory=dict)
    message: str = ""

    def line(self) -> str:
        if self.cls == "crash":
            return f"crash: {self.message}"
        bits = ",".join(f"{b}x{n}" for b, n in sorted(self.flipped_bits.items()))
        return (f"{self.cls}: {self.bad}/{self.total} bad, max_abs={self.max_abs:.4g} max_rel={self.max_rel:.4g} "
                f"max_ulp={self.max_ulp:.4g} first={self.bad_indices[:3]} flipped_bits={{{bits}}}")

    def signature(self) -> tuple[str, int]:
        """What must hold while shrinking: the class and the most-flipped bit (-1 when none)."""
        top = max(self.flipped_bits.items(), key=lambda kv: (kv[1], kv[0]))[0] if self.flipped_bits else -1
        return self.cls, top


@dataclass(frozen=True, slots=True, kw_only=True)
class Divergence:
    """The first op whose output left the tolerance, with what it consumed."""

    rank: int
    index: int
    op: str
    output: int
    metric: Metric
    device: str
    reference: str
    stack: list[str] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list, repr=False)
    """The suspect's input tensors to the op (host copies), in `fmt.flat_tensors(args)` order."""
    reduce_op: str = ""
    """A collective divergence: the reduction of an all-reduce or reduce-scatter (sum, avg, product,
    min, max); "" for one that moves data."""
    collective: str = ""
    """A collective divergence: all_reduce, all_gather, reduce_scatter, broadcast or all_to_all."""
    source: int = 0
    """A broadcast's source (group rank)."""
    splits: list[list[int]] | None = None
    """An uneven all-to-all: every group rank's input split sizes (rows of dim 0 to each rank; elements
    for the list form, checked flattened); None otherwise."""
    members: list[int] = field(default_factory=list)
    """A collective divergence: the global rank of each of the call's ranks, in group-rank order (a send
    and its receive: sender, receiver); the file's rank k stands for `members[k]`."""


@dataclass(slots=True, kw_only=True)
class ReplayResult:
    rank: int
    ops: int
    divergence: Divergence | None
    capture_mismatch: int | None
    """First op whose replayed bits differ from the capture's fingerprint (None: bit-exact replay)."""
    not_compared: list[str] = field(default_factory=list)
    """Ops replayed but not compared, with why (the reference cannot run them: never a finding)."""
    native: list[str] = field(default_factory=list)
    """Ops with no float64 kernel (grouped GEMMs), compared with the same op in their own dtype on the
    reference device (`reference_call`)."""
    stand_in: list[str] = field(default_factory=list)
    """Fused attention ops the reference cannot run (CUDA's flash, efficient, cuDNN), compared with their
    math definition in float64 (`fused.fused_reference`)."""
    collective_inputs: list[tuple[int, list[Any]]] = field(default_factory=list, repr=False)
    collective_outputs: list[tuple[int, list[Any]]] = field(default_factory=list, repr=False)


# --- decoding ---------------------------------------------------------------------------------

# Namespaces of ops that torch registers only when a module is imported (FSDP2's copy-in / copy-out).
_OP_MODULES = {"fsdp": "torch.distributed.fsdp._fully_shard._fsdp_collectives",
               "_c10d_functional": "torch.distributed._functional_collectives",
               "_dtensor": "torch.distributed.tensor"}


def resolve_op(name: str) -> Any:
    """`aten.mm.default` -> torch.ops.aten.mm.default."""
    import importlib

    ns, _, rest = name.partition(".")
    packet, _, overload = rest.rpartition(".")
    if ns in _OP_MODULES:
        try:
            importlib.import_module(_OP_MODULES[ns])
        except ImportError:  # torch without distributed: the op is then reported as unavailable below
            pass
    try:
        return getattr(getattr(getattr(torch.ops, ns), packet), overload)
    except (AttributeError, RuntimeError) as e:
        raise ReplayError(f"op {name!r} is not available in torch {torch.__version__}") from e


def external(cap: fmt.Capture, ref: fmt.TensorRef, device: str) -> torch.Tensor:
    """A saved input tensor, with its recorded strides."""
    m = ref.meta
    data = fmt.get_blob(cap.root, ref.sha256)
    t = fmt.tensor_from_bytes(data, m.shape, m.dtype, device)
    if list(t.stride()) != m.stride and t.numel() > 1:
        t = torch.empty_strided(m.shape, m.stride, dtype=t.dtype, device=device).copy_(t)
    return t


def decode(x: Any, live: dict[int, Any], device: str, upcast: bool = False) -> Any:
    """A JSON argument back to a value; tensors from `live` (vid -> tensor)."""
    if isinstance(x, list):
        return [decode(v, live, device, upcast) for v in x]
    if not isinstance(x, dict):
        return x
    if "t" in x:
        return live[x["t"]]
    if "float" in x:
        return float(x["float"])
    if "dtype" in x:
        dt = getattr(torch, x["dtype"])
        return torch.float64 if upcast and dt in _FLOATS else dt
    if "device" in x:
        return torch.device(device)
    if "layout" in x:
        return getattr(torch, x["layout"])
    if "memory_format" in x:
        return getattr(torch, x["memory_format"])
    if "script_object" in x:
        return None  # a process group / reduce op / work: only substituted collectives take them
    if "opaque" in x:
        # an object capture could not encode: a torch.Generator, which only random ops take (their recorded
        # outputs are substituted); any other op given None instead fails on every device alike, and
        # replay reports that as a capture defect, never as the chip's fault
        return None
    raise ReplayError(f"cannot replay an argument of type {x}")


def map_tensors(x: Any, fn: Any) -> Any:
    if isinstance(x, list):
        return [map_tensors(v, fn) for v in x]
    if isinstance(x, tuple):
        return tuple(map_tensors(v, fn) for v in x)
    return fn(x) if isinstance(x, torch.Tensor) else x


def out_list(out: Any) -> list[Any]:
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    flat: list[Any] = []
    for x in items:
        flat.extend(x if isinstance(x, (list, tuple)) else [x])
    return flat


def to_reference(t: torch.Tensor, device: str, upcast: bool) -> torch.Tensor:
    """A copy of a suspect tensor for the reference (float64 when upcasting), keeping strides."""
    dt = torch.float64 if upcast and t.dtype in _FLOATS else t.dtype
    return t.detach().to(device=device, dtype=dt, copy=True)  # preserve_format: strides kept where dense


# --- comparison -------------------------------------------------------------------------------

class RefHow(enum.Enum):
    """How `reference_call` ran an op."""

    AS_ASKED = enum.auto()
    NATIVE = enum.auto()
    """In the op's own dtype on the reference device: it has no float64 kernel."""
    STAND_IN = enum.auto()
    """As its float64 math definition (`fused.fused_reference`): the reference has no such kernel."""


def reference_call(func: Any, build: Callable[[bool], tuple[Any, dict[str, Any]]],
                   upcast: bool) -> tuple[list[Any], Any, dict[str, Any], RefHow]:
    """The op on the reference, on the arguments `build(upcast)` puts there: (outputs, those arguments,
    how). An op with no float64 kernel (`_grouped_mm`: an MoE's expert GEMMs) that writes none of its
    arguments runs on `build(False)` (NATIVE): the same inputs in their own dtype on the reference
    device, judged with the same tolerance (an op that writes its arguments cannot be re-run: the
    caller's copies are already spent, and the error stands). A fused attention kernel the reference
    does not have (CUDA's flash, efficient, cuDNN) is replaced by its math definition in float64
    (STAND_IN)."""
    args, kwargs = build(upcast)
    try:
        return out_list(func(*args, **kwargs)), args, kwargs, RefHow.AS_ASKED
    except Exception:
        outs = stand_in(func.overloadpacket.__name__, args, kwargs)
        if outs:
            return outs, args, kwargs, RefHow.STAND_IN
        if not upcast or func._schema.is_mutable:
            raise
    args, kwargs = build(False)
    return out_list(func(*args, **kwargs)), args, kwargs, RefHow.NATIVE


def stand_in(name: str, ref_args: Any, ref_kwargs: dict[str, Any]) -> list[Any] | None:
    """The float64 math outputs of fused attention op `name` (overload packet) that the reference cannot
    run (None: another op, or one that cannot be rebuilt from its arguments)."""
    if name not in fused.STANDS_IN:
        return None
    try:
        return fused.fused_reference(name, list(ref_args), ref_kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None


def compare_op(func: Any, actual: torch.Tensor, ref: torch.Tensor, exact: bool, ref_args: Any,
               ref_kwargs: dict[str, Any], output: int) -> Metric | None:
    """`compare`, with a sum's tolerance widened to the rounding its terms allow (`SUMS`; a norm's,
    softmax's or attention's backward: `terms.cancelling_terms`): computed only for an output the plain
    tolerance rejects (the wider one accepts whatever the plain one does)."""
    m = compare(actual, ref, exact)
    name = func.overloadpacket.__name__
    if m is None or exact:
        return m
    if name in SUMS:
        return compare(actual, ref, exact, magnitude=out_list(func(*absolute(ref_args), **absolute(ref_kwargs)))[output])
    if name not in CANCELLING:
        return m
    bound = cancelling_terms(name, list(ref_args), ref_kwargs, output)
    return m if bound is None else compare(actual, ref, exact, magnitude=bound)


def absolute(x: Any) -> Any:
    """Arguments with every floating-point tensor and the `alpha`/`beta` scalars made non-negative."""
    if isinstance(x, dict):
        return {k: abs(v) if k in ("alpha", "beta") and isinstance(v, (int, float)) else absolute(v)
                for k, v in x.items()}
    return map_tensors(x, lambda t: t.abs() if t.is_floating_point() else t)


def compare(actual: torch.Tensor, ref: torch.Tensor, exact: bool,
            magnitude: torch.Tensor | None = None) -> Metric | None:
    """None when `actual` agrees with `ref` (bitwise when exact, else within RTOL of float64, scaled
    by `magnitude` where that is larger: the op on the inputs' absolute values)."""
    if actual.shape != ref.shape:
        return Metric(cls="wrong", message=f"shape {tuple(actual.shape)} vs {tuple(ref.shape)}")
    a = actual.detach().cpu()
    r = ref.detach().cpu()
    if not a.is_floating_point() or a.dtype not in RTOL:
        bad = a != r.to(a.dtype)
        n = int(bad.sum())
        return None if n == 0 else Metric(cls="wrong", bad=n, total=a.numel(),
                                          bad_indices=_indices(bad), message="integer/bool output differs")
    a64, r64 = a.double(), r.double()
    err = (a64 - r64).abs()
    same_special = (a64 == r64) | (torch.isnan(a64) & torch.isnan(r64))
    if exact:
        bk = backend_of(a)
        bad = bk.bits(a) != bk.bits(r.to(a.dtype))
    else:
        scale = r64.abs() + (r64[torch.isfinite(r64)].pow(2).mean().sqrt() if r64.numel() else 0.0)
        if magnitude is not None and magnitude.shape == r64.shape:
            scale = torch.maximum(scale, magnitude.detach().cpu().double().abs())
        bad = ~((err <= RTOL[a.dtype] * scale) | same_special)
    n = int(bad.sum())
    if n == 0:
        return None
    nonfinite = bool((~torch.isfinite(a64[bad]) & torch.isfinite(r64[bad])).any())
    e = err[bad]
    finite = e[torch.isfinite(e)]
    rel = (e / r64[bad].abs().clamp_min(1e-300))
    rel = rel[torch.isfinite(rel)]
    exp = torch.frexp(r64[bad].to(a.dtype).double().abs().clamp_min(torch.finfo(a.dtype).tiny)).exponent
    ulp = torch.ldexp(torch.ones_like(e), (exp - _MANTISSA[a.dtype]).to(torch.int64))
    ulps = (e / ulp)[torch.isfinite(e / ulp)]
    mm = oracles.compare_bits(backend_of(a), r.to(a.dtype).reshape(-1)[bad.reshape(-1)],
                              a.reshape(-1)[bad.reshape(-1)], tensor="out")
    return Metric(cls="nonfinite" if nonfinite else "wrong",
                  max_abs=float(finite.max()) if finite.numel() else math.inf,
                  max_rel=float(rel.max()) if rel.numel() else math.inf,
                  max_ulp=float(ulps.max()) if ulps.numel() else math.inf,
                  bad=n, total=a.numel(), bad_indices=_indices(bad),
                  flipped_bits=dict(mm.bit_histogram) if mm else {})


def _indices(bad: torch.Tensor) -> list[list[int]]:
    return [list(map(int, ix)) for ix in torch.nonzero(bad)[: oracles.MAX_LISTED].tolist()]


# --- the simulated bad chip -------------------------------------------------------------------

@dataclass(slots=True)
class Simulation:
    """Which original ops a probes/faults.py spec hits (see the module docstring)."""

    faults: list[faultmod.Fault]
    rank: int
    calls: dict[int, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | None, rank: int) -> Simulation | None:
        if not spec:
            return None
        fs = [f for f in faultmod.parse(spec) if f.ranks is None or rank in f.ranks]
        return cls(fs, rank) if fs else None

    def schedule(self, ops: list[fmt.OpRecord]) -> dict[int, list[faultmod.Fault]]:
        """Original op index -> faults (rebased to fire on that op's first call)."""
        out: dict[int, list[faultmod.Fault]] = {}
        calls: dict[int, int] = {}
        for rec in ops:
            name = rec.op.split(".")[1] if "." in rec.op else rec.op
            for i, f in enumerate(self.faults):
                if not (f.op == name if f.op else name in faultmod.DEFAULT_OPS):
                    continue
                floats = [m for m in rec.out_meta if m and m.dtype in ("float32", "float64", "bfloat16", "float16")]
                k = f.output or 0
                if k >= len(floats) or (f.dtype and floats[k].dtype != f.dtype):
                    continue
                n = calls.get(i, 0)
                calls[i] = n + 1
                if n < f.after or (n - f.after) % f.every or (f.count and n >= f.after + f.count * f.every):
                    continue
                # faults.corrupt seeds its element choice with seed * 1000003 + call; an isolated op is
                # call 0, so solve for the seed that picks the element the step's call n picked.
                seed = ((f.seed * 1_000_003 + n) * _INV) & 0x7FFFFFFF
                out.setdefault(rec.index, []).append(replace(f, after=0, count=1, every=1, ranks=None,
                                                             probe=None, scope="probe", at="call", seed=seed))
        return out


def injector(fs: list[faultmod.Fault] | None) -> Any:
    if not fs:
        import contextlib

        return contextlib.nullcontext()
    return faultmod.make_injector(fs, 0, "repro")()


# --- replay -----------------------------------------------------------------------------------

def parse_reference(spec: str, root: Any = None) -> tuple[str, bool]:
    """(device, upcast) for `cpu64`, a device string, or `rank:N`."""
    s = spec.strip().lower()
    if s == "cpu64":
        return "cpu", True
    if s.startswith("rank:"):
        try:
            cap = fmt.load(root, int(s[5:]))
        except ValueError:
            raise ReplayError(f"--reference {spec!r}: expected rank:N with N a captured rank") from None
        return cap.device, False
    if s.split(":")[0] in ("cpu", "cuda"):
        if s.startswith("cuda") and not torch.cuda.is_available():
            raise ReplayError(f"--reference {spec!r}: no CUDA device here; use cpu64")
        return s, False
    raise ReplayError(f"--reference {spec!r}: use cpu64, a device (cpu, cuda:1) or rank:N")


def replay(cap: fmt.Capture, *, device: str | None = None, reference: str = "cpu64", inject: str | None = None,
           stop_at_first: bool = True, keep_collectives: bool = False) -> ReplayResult:
    """Replay `cap` on `device` (default: where it was captured), comparing each op with `reference`."""
    dev = device or cap.device
    ref_dev, upcast = parse_reference(reference, cap.root)
    sim = Simulation.parse(inject, cap.rank)
    schedule = sim.schedule(cap.ops) if sim else {}
    live: dict[int, Any] = {vid: external(cap, ref, dev) for vid, ref in cap.tensors.items()}
    result = ReplayResult(rank=cap.rank, ops=len(cap.ops), divergence=None, capture_mismatch=None)
    # under the settings the step ran with (threads, matmul precision, ...): the same kernels, so the
    # replay rebuilds what was captured bit for bit (a collective's payload as it was sent)
    with torch.no_grad(), st.applied(cap.settings) if cap.settings else contextlib.nullcontext():
        for rec in cap.ops:
            args = decode(rec.args, live, dev)
            kwargs = {k: decode(v, live, dev) for k, v in rec.kwargs.items()}
            if rec.substituted:
                outs = substitute(cap, rec, args, dev, result, keep_collectives)
            else:
                func = resolve_op(rec.op)
                snapshot = [t.detach().clone().cpu() for t in fmt.flat_tensors(args)] if stop_at_first else []
                ref_args: Any = None
                ref_kwargs: dict[str, Any] = {}
                compared = not func.is_view and rec.op.split(".")[1] not in _UNDEFINED
                if compared and result.divergence is None:
                    ref_args = map_tensors(args, lambda t: to_reference(t, ref_dev, upcast))
                    ref_kwargs = {k: map_tensors(decode(v, live, ref_dev, upcast), lambda t: to_reference(
                        t, ref_dev, upcast)) for k, v in rec.kwargs.items()}
                try:
                    with injector(schedule.get(rec.index)):
                        out = func(*args, **kwargs)
                except Exception as e:  # the suspect crashed inside the op: the finding, unless everyone does
                    if _crashes_on_reference(func, args, kwargs, ref_dev, upcast):
                        raise CaptureDefect(cap.rank, rec.index, rec.op, f"{type(e).__name__}: {e}") from None
                    result.divergence = Divergence(rank=cap.rank, index=rec.index, op=rec.op, output=0,
                                                   metric=Metric(cls="crash", message=f"{type(e).__name__}: {e}"),
                                                   device=dev, reference=reference, stack=rec.stack,
                                                   inputs=snapshot)
                    break
                outs = out_list(out)
                if ref_args is not None:
                    try:
                        ref_outs, ref_args, ref_kwargs, how = reference_call(
                            func, _made_or_native(ref_args, ref_kwargs, args, kwargs, ref_dev, upcast), upcast)
                        if how is not RefHow.AS_ASKED:
                            (result.native if how is RefHow.NATIVE else result.stand_in).append(
                                f"op #{rec.index} {rec.op}")
                    except Exception as e:  # noqa: BLE001 - e.g. AMP's unscale takes float32 only, not cpu64
                        result.not_compared.append(f"op #{rec.index} {rec.op}: the reference cannot run it "
                                                   f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                        ref_outs = []
                    for j, (a, r) in enumerate(zip(outs, ref_outs, strict=False)):
                        if isinstance(a, torch.Tensor) and isinstance(r, torch.Tensor):
                            m = compare_op(func, a, r, not upcast, ref_args, ref_kwargs, j)
                            if m is not None:
                                result.divergence = Divergence(rank=cap.rank, index=rec.index, op=rec.op, output=j,
                                                               metric=m, device=dev, reference=reference,
                                                               stack=rec.stack, inputs=snapshot)
                                break
                if result.capture_mismatch is None and compared:
                    for a, fp in zip(outs, rec.fingerprints, strict=False):
                        if isinstance(a, torch.Tensor) and fp and fmt.fingerprint(a, cap.fingerprint) != fp:
                            result.capture_mismatch = rec.index
                            break
            for vid, t in zip(rec.outputs, outs, strict=False):
                if vid is not None and isinstance(t, torch.Tensor):
                    live[vid] = t
            if result.divergence is not None and stop_at_first:
                break
    return result


def _made_or_native(ref_args: Any, ref_kwargs: dict[str, Any], args: Any, kwargs: dict[str, Any],
                    ref_dev: str, upcast: bool) -> Callable[[bool], tuple[Any, dict[str, Any]]]:
    """`reference_call`'s builder in replay: the copies made before the suspect ran, or (lowered) new
    ones of the suspect's arguments, still as they were: only an op that writes none is lowered."""
    def build(up: bool) -> tuple[Any, dict[str, Any]]:
        if up == upcast:
            return ref_args, ref_kwargs
        return (map_tensors(args, lambda t: to_reference(t, ref_dev, False)),
                {k: map_tensors(v, lambda t: to_reference(t, ref_dev, False)) for k, v in kwargs.items()})
    return build


def _crashes_on_reference(func: Any, args: Any, kwargs: dict[str, Any], ref_dev: str, upcast: bool) -> bool:
    """Does the op crash on the reference too, from copies of the same inputs (views kept as views)?"""
    def copy(t: torch.Tensor) -> torch.Tensor:
        try:
            return to_reference(t, ref_dev, upcast)
        except Exception:  # noqa: BLE001 - an input that cannot even be copied is unusable everywhere
            return t
    try:
        func(*map_tensors(args, copy), **{k: map_tensors(v, copy) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001
        return True
    return False


def substitute(cap: fmt.Capture, rec: fmt.OpRecord, args: Any, dev: str, result: ReplayResult,
                keep: bool) -> list[Any]:
    """Outputs of a random op or a collective: the recorded values (in place for c10d ops)."""
    ins = fmt.flat_tensors(args)
    if rec.collective is not None and keep:
        result.collective_inputs.append((rec.index, [t.detach().clone().cpu() for t in ins]))
    outs: list[Any] = []
    for k, (blob, m) in enumerate(zip(rec.recorded, rec.out_meta, strict=False)):
        if not blob or m is None:
            outs.append(None)
            continue
        value = fmt.tensor_from_bytes(fmt.get_blob(cap.root, blob), m.shape, m.dtype, dev)
        if list(value.stride()) != m.stride and value.numel() > 1:  # later views rely on the layout
            value = torch.empty_strided(m.shape, m.stride, dtype=value.dtype, device=dev).copy_(value)
        if rec.collective is not None and rec.op.startswith("c10d.") and k < len(ins):
            ins[k].copy_(value)  # in-place collective: later ops hold views of this very tensor
            value = ins[k]
        outs.append(value)
    if rec.collective is not None and keep:
        result.collective_outputs.append((rec.index, [o.detach().clone().cpu() for o in outs if o is not None]))
    return outs


CHECKED_REDUCTIONS = ("sum", "avg", "product", "min", "max")


def collective_kind(op: str) -> str | None:
    """all_reduce, all_gather, reduce_scatter, broadcast or all_to_all for a c10d or functional
    collective's overload name (`c10d._allgather_base_.default`, ...; c10d's coalesced forms are their
    collective over several tensors, as are the functional coalesced forms; c10d's list form of alltoall
    is an uneven all-to-all); None for an op that is not one of these."""
    name = op.split(".")[1] if op.count(".") >= 2 else op
    for kind, spellings in (("all_reduce", ("allreduce", "all_reduce")), ("all_gather", ("allgather", "all_gather")),
                            ("reduce_scatter", ("reduce_scatter",)), ("broadcast", ("broadcast",)),
                            ("all_to_all", ("alltoall", "all_to_all"))):
        if any(name.lstrip("_").startswith(w) for w in spellings):
            return kind
    return None


def _payload(kind: str, op: str, ins: list[Any], outs: list[Any]) -> list[tuple[list[int], Any]]:
    """(positions in `ins` of what this rank contributed, what it ended with) per tensor of the call.
    c10d ops list their outputs first (`allgather_(outputs, input)`, `_reduce_scatter_base_(output,
    input)`); in-place ones (all_reduce, broadcast) hold the value before the call in `ins` and after
    it in `outs`."""
    if kind in ("all_reduce", "broadcast"):
        return [([j], o) for j, o in enumerate(outs[:len(ins)])]
    if not outs:
        return []
    if "coalesced" in op and op.startswith("c10d."):  # `allgather_into_tensor_coalesced_(outputs, inputs)`
        return [([len(outs) + j], o) for j, o in enumerate(outs)] if len(ins) == 2 * len(outs) else []
    if "coalesced" in op:  # functional: `all_gather_into_tensor_coalesced(inputs, ...)` returns one per input
        return [([j], o) for j, o in enumerate(outs)] if len(ins) == len(outs) else []
    listed = kind == "all_gather" or _listed_a2a(op)  # a list of outputs, one per group rank
    out = torch.cat([o.reshape(-1) for o in outs]) if listed else outs[0]
    if not op.startswith("c10d."):
        return [([0], out)]
    first = len(outs) if listed else 1
    return [(list(range(first, len(ins))), out)] if len(ins) > first else []


def _a2a_splits(rec: fmt.OpRecord) -> tuple[list[int], list[int]]:
    """An all-to-all's (output, input) split sizes, rows of dim 0 per group rank ([] for equal chunks):
    `alltoall_base_(output, input, pg, output_split_sizes, input_split_sizes, timeout)` or the
    functional `all_to_all_single(input, output_split_sizes, input_split_sizes, group)`."""
    i = 3 if rec.op.startswith("c10d.") else 1
    got = [a if isinstance(a, list) and all(isinstance(x, int) for x in a) else None for a in rec.args[i:i + 2]]
    return (got[0] or [], got[1] or []) if len(got) == 2 else ([], [])


def _listed_a2a(op: str) -> bool:
    """c10d's list form, `alltoall_(outputs, inputs, pg, timeout)`: input k goes to rank k, output j
    comes from rank j; the tensors' sizes are its split sizes (in elements: it is checked flattened)."""
    return op.split(".")[1:2] == ["alltoall_"]


def _a2a_layout(recs: list[fmt.OpRecord], ins: list[Any],
                listed: list[tuple[list[int], list[int]]] | None = None) -> list[list[int]] | None:
    """Every group rank's input split sizes, None for equal chunks; raises ValueError when the ranks'
    recorded splits do not fit together (what rank j sends to rank g is what g expects from j).
    `listed`: the list form's (output, input) sizes per group rank, in place of recorded splits."""
    pairs = listed or [_a2a_splits(r) for r in recs]
    if not any(o or i for o, i in pairs):
        return None
    world = len(recs)
    sent = [i or [x.shape[0] // world] * world for (_, i), x in zip(pairs, ins, strict=True)]
    for g, (o, _) in enumerate(pairs):
        if len(sent[g]) != world or (o and o != [sent[j][g] for j in range(world)]):
            raise ValueError("the ranks' all-to-all split sizes do not fit together")
    return sent


def _listed_sizes(results: list[ReplayResult], call: list[tuple[int, int, fmt.OpRecord]]
                  ) -> list[tuple[list[int], list[int]]] | None:
    """The list form of alltoall's (output, input) tensor sizes per group rank; None for other forms."""
    if not _listed_a2a(call[0][2].op):
        return None
    out = []
    for i, k, _ in call:
        outs = results[i].collective_outputs[k][1]
        out.append(([o.numel() for o in outs], [x.numel() for x in results[i].collective_inputs[k][1][len(outs):]]))
    return out


def _sent(ins: list[Any], where: list[int]) -> Any:
    return ins[where[0]] if len(where) == 1 else torch.cat([ins[p].reshape(-1) for p in where])


def _as_sent(cap: fmt.Capture, rec: fmt.OpRecord, ins: list[Any], where: list[int]) -> bool:
    """Is the replayed payload what the rank sent when it was captured (its recorded fingerprints)?
    When it is not (an input the capture could not rebuild), the collective cannot be judged."""
    fps = rec.in_fingerprints
    return all(p < len(fps) and fps[p] and fmt.fingerprint(ins[p], cap.fingerprint) == fps[p] for p in where)


def _source(rec: fmt.OpRecord) -> int:
    """A broadcast's source (group rank): `broadcast_(tensors, pg, root_rank, ...)` or the functional
    `broadcast(input, src, group)`."""
    i = 2 if rec.op.startswith("c10d.") else 1
    return int(rec.args[i]) if len(rec.args) > i and isinstance(rec.args[i], int) else 0


def check_collectives(results: list[ReplayResult], caps: list[fmt.Capture],
                      unjudged: list[str] | None = None) -> Divergence | None:
    """The first collective whose result on some rank differs from the exact host-side result of
    every group rank's input (replayed bits): an all-reduce or reduce-scatter from the exact reduction
    (its recorded op: sum, avg, product, min or max) within the roundings it may make, an all-gather,
    broadcast or all-to-all from the bytes sent, exactly, and what a receive got from the bytes its
    send sent. Calls are lined up per process group (`_calls`), so a
    capture with subgroups (TP and DP groups interleaved) is checked call by call in each group.
    A collective whose replayed payload is not what some rank sent (by the fingerprints recorded when
    it was captured) is not judged: it is listed in `unjudged`, never blamed."""
    if len(results) < 2 or not all(r.collective_inputs for r in results):
        return None
    for call in _calls(results, caps, unjudged):
        div = _check_call(results, caps, call, unjudged)
        if div is not None:
            return div
    return None


def _calls(results: list[ReplayResult], caps: list[fmt.Capture],
           unjudged: list[str] | None) -> list[list[tuple[int, int, fmt.OpRecord]]]:
    """Every collective call, as (capture, k, record) of each member that made it, in group-rank order.

    Calls on one process group are ordered (one communicator), so the i-th collective on a group is the
    i-th collective of each of its members on that group. Sends and receives, which only two members
    make, are lined up apart (a pipeline stage's p2p between collectives does not shift them): the i-th
    send from one rank to another (in one group, with one tag) is the i-th receive there from it, a
    call of (sender, receiver); a receive from any source is matched by the source its work reported
    once it landed (one that had not: listed in `unjudged`). A
    group's members are the global ranks recorded with its calls (every capture where none were
    recorded). A group with a member that was not captured is not checked (listed in `unjudged`), nor
    are its calls from the first where its members disagree on the op (they no longer line up).
    Ordered by where the lowest member made each call."""
    by_index = [{o.index: o for o in cap.ops} for cap in caps]
    seqs: list[dict[str, list[tuple[int, fmt.OpRecord]]]] = []
    p2p: dict[str, dict[tuple[int, int, str, int], list[tuple[int, int, fmt.OpRecord]]]] = {"send": {}, "recv_": {}}
    for i, r in enumerate(results):
        seq: dict[str, list[tuple[int, fmt.OpRecord]]] = {}
        for k, (idx, _) in enumerate(r.collective_inputs):
            rec = by_index[i][idx]
            if fmt.is_p2p(rec.op):  # pairs a sender with a receiver, not every member: matched below
                key = _p2p_key(caps[i].rank, rec)
                if key is None:
                    if unjudged is not None:
                        unjudged.append(f"op #{rec.index} {rec.op}: its peer is not known" + (
                            " (a receive from any source that had not landed when it was recorded)"
                            if "recv_any_source_" in rec.op else ""))
                else:
                    p2p["send" if rec.op.split(".")[1] == "send" else "recv_"].setdefault(key, []).append((i, k, rec))
                continue
            seq.setdefault(str((rec.collective or {}).get("group", "")), []).append((k, rec))
        seqs.append(seq)
    where = {cap.rank: i for i, cap in enumerate(caps)}
    # the i-th send from a rank to another (one group, one tag) is the i-th receive there from it; one
    # whose peer was not captured has no partner
    recvs = p2p["recv_"]
    calls: list[list[tuple[int, int, fmt.OpRecord]]] = [
        [sent, got] for key, sends in p2p["send"].items() for sent, got in zip(sends, recvs.get(key, []), strict=False)]
    for group in sorted({g for s in seqs for g in s}):
        first = next(s[group][0][1] for s in seqs if group in s)
        ranks = [int(x) for x in (first.collective or {}).get("ranks", [])]
        if ranks and any(x not in where for x in ranks):
            if unjudged is not None:
                unjudged.append(f"group {group or '(default)'}: rank(s) "
                                f"{sorted(x for x in ranks if x not in where)} not captured")
            continue
        members = [where[x] for x in ranks] if ranks else [i for i, s in enumerate(seqs) if group in s]
        if len(members) < 2 or any(group not in seqs[m] for m in members):
            continue
        for j in range(min(len(seqs[m][group]) for m in members)):
            call = [(m, *seqs[m][group][j]) for m in members]
            if len({rec.op for _, _, rec in call}) != 1:
                break  # the members' j-th calls differ: the order no longer lines up
            calls.append(sorted(call, key=lambda c: int((c[2].collective or {}).get("rank", c[0]))))
    return sorted(calls, key=lambda c: min(k for _, k, _ in c))


def _p2p_key(rank: int, rec: fmt.OpRecord) -> tuple[int, int, str, int] | None:
    """(sender, receiver, group, tag), global ranks, of `send(tensors, pg, dst, tag)` or
    `recv_(tensors, pg, src, tag)` made by global rank `rank`, or of `recv_any_source_(tensors, pg, tag)`
    by the source its work reported (recorded at capture); None when the peer is not known."""
    info = rec.collective or {}
    ranks = [int(x) for x in info.get("ranks", [])]
    if rec.op.split(".")[1] == "recv_any_source_":
        peer_arg, tag_arg = info.get("source"), rec.args[2] if len(rec.args) > 2 else 0
    elif len(rec.args) >= 4:
        peer_arg, tag_arg = rec.args[2], rec.args[3]
    else:
        return None
    if not isinstance(peer_arg, int):
        return None
    peer = ranks[peer_arg] if ranks and peer_arg < len(ranks) else peer_arg
    tag = tag_arg if isinstance(tag_arg, int) else 0
    group = str(info.get("group", ""))
    return (rank, peer, group, tag) if rec.op.split(".")[1] == "send" else (peer, rank, group, tag)


def _check_p2p(results: list[ReplayResult], caps: list[fmt.Capture], call: list[tuple[int, int, fmt.OpRecord]],
               unjudged: list[str] | None) -> Divergence | None:
    """A send and its receive: what arrived (recorded at capture) against what the sender sent (its
    replayed payload, when that is what it sent: its recorded fingerprint), bit for bit."""
    (si, sk, srec), (ri, rk, rrec) = call
    ins = results[si].collective_inputs[sk][1]
    outs = results[ri].collective_outputs[rk][1]
    why = ("the receive was recorded before it landed (an irecv not yet waited for)"
           if not (rrec.collective or {}).get("complete") else
           "the sender's replayed payload is not what it sent" if not ins or not _as_sent(caps[si], srec, ins, [0]) else
           "what arrived differs in shape or dtype from what was sent"
           if not outs or outs[0].shape != ins[0].shape or outs[0].dtype != ins[0].dtype else
           "no integer of its element's width to compare bits with" if ins[0].element_size() not in INT_BY_WIDTH
           else "")
    if why:
        if unjudged is not None:
            unjudged.append(f"op #{rrec.index} {rrec.op} on rank {caps[ri].rank}: {why}")
        return None
    sent, got = ins[0], outs[0]
    bk = backend_of(got)
    bad = bk.bits(sent.reshape(-1)) != bk.bits(got.reshape(-1))
    if not bool(bad.any()):
        return None
    mm = oracles.compare_bits(bk, sent.reshape(-1)[bad], got.reshape(-1)[bad], tensor="out")
    err = (got.double() - sent.double()).abs().reshape(-1)[bad]
    src, dst = caps[si].rank, caps[ri].rank
    m = Metric(cls="wrong", max_abs=float(err.max()), bad=int(bad.sum()), total=got.numel(),
               bad_indices=_indices(bad.reshape(got.shape)), flipped_bits=dict(mm.bit_histogram) if mm else {},
               message=f"what rank {dst} received from rank {src} differs from what rank {src} sent, bit for bit "
                       f"(the link between them or either end's NIC)")
    return Divergence(rank=dst, index=rrec.index, op=rrec.op, output=0, metric=m, device=caps[ri].device,
                      reference="host-exact", stack=rrec.stack, inputs=[sent, torch.zeros_like(sent)],
                      collective="send_recv", source=0, members=[src, dst])


def _check_call(results: list[ReplayResult], caps: list[fmt.Capture], call: list[tuple[int, int, fmt.OpRecord]],
                unjudged: list[str] | None) -> Divergence | None:
    """One lined-up collective call (its members in group-rank order; a send and its receive, in that
    order) against its exact result."""
    if fmt.is_p2p(call[0][2].op):
        return _check_p2p(results, caps, call, unjudged)
    recs = [rec for _, _, rec in call]
    kind = collective_kind(recs[0].op)
    red = str((recs[0].collective or {}).get("reduce_op", "sum")) if kind in ("all_reduce", "reduce_scatter") else ""
    if kind is None or (red and red not in CHECKED_REDUCTIONS):
        # reduce/gather/scatter to one root, bitwise reductions of integers: listed, never silently passed
        if unjudged is not None and "barrier" not in recs[0].op:  # a barrier moves no data
            unjudged.append(f"op #{recs[0].index} {recs[0].op}: " +
                            ("not a collective this check knows" if kind is None else f"the {red} reduction is not checked"))
        return None
    ins = [results[i].collective_inputs[k][1] for i, k, _ in call]
    parts = [_payload(kind, rec.op, results[i].collective_inputs[k][1], results[i].collective_outputs[k][1])
             for i, k, rec in call]
    src = _source(recs[0])
    for j in range(min(len(p) for p in parts)):
        sent = [_sent(x, p[j][0]) for x, p in zip(ins, parts, strict=True)]
        try:
            splits = _a2a_layout(recs, sent, _listed_sizes(results, call)) if kind == "all_to_all" else None
        except ValueError:
            if unjudged is not None:
                unjudged.append(f"op #{recs[0].index} {recs[0].op}: split sizes do not fit together")
            continue
        needed = [src] if kind == "broadcast" else range(len(call))
        if not all(g < len(call) and _as_sent(caps[call[g][0]], recs[g], ins[g], parts[g][j][0]) for g in needed):
            if unjudged is not None:
                unjudged.append(f"op #{recs[0].index} {recs[0].op}: a replayed payload is not what was sent")
            continue
        for g, (i, _, rec) in enumerate(call):
            act = parts[g][j][1]
            u = 2.0 ** -_MANTISSA.get(act.dtype, 53)
            exp64, tol = exact_result(kind, red, [x.double() for x in sent], g, src, u, splits)
            got = act.reshape(-1).double()
            if got.shape != exp64.shape:
                continue  # a layout this check does not know: not judged
            err = (got - exp64).abs()
            bad = ~((err <= tol) | (got == exp64) | (torch.isnan(got) & torch.isnan(exp64)))
            if bool(bad.any()):
                mm = oracles.compare_bits(backend_of(act), exp64.to(act.dtype)[bad], act.reshape(-1)[bad], tensor="out")
                what = f"{kind} ({red})" if red else kind
                exact = f"the exact {red} of every rank's input" if red else "what the ranks sent, bit for bit"
                if kind in ("all_gather", "all_to_all"):  # which sender's part arrived wrong (group ranks)
                    ends = _part_ends(kind, sent, g, splits)
                    senders = sorted({bisect.bisect_right(ends, int(x)) for x in bad.nonzero().reshape(-1).tolist()})
                    exact += f" (wrong in the part{'s' if len(senders) > 1 else ''} from rank " \
                             f"{', '.join(map(str, senders))})"
                m = Metric(cls="wrong", max_abs=float(err[bad].max()), bad=int(bad.sum()), total=got.numel(),
                           bad_indices=_indices(bad.reshape(act.shape) if bad.numel() == act.numel() else bad),
                           flipped_bits=dict(mm.bit_histogram) if mm else {},
                           message=f"{what} result differs from {exact}")
                cap = caps[i]
                return Divergence(rank=cap.rank, index=rec.index, op=rec.op, output=j, metric=m,
                                  device=cap.device, reference="host-exact", stack=rec.stack,
                                  inputs=sent, reduce_op=red, collective=kind, source=_source(rec), splits=splits,
                                  members=[caps[m].rank for m, _, _ in call])
    return None


def _part_ends(kind: str, sent: list[Any], rank: int, splits: list[list[int]] | None) -> list[int]:
    """Where each sender's part of group rank `rank`'s all-gather or all-to-all result ends (flat
    elements, cumulative, in sender order)."""
    if kind == "all_gather":
        return list(itertools.accumulate(x.numel() for x in sent))
    sizes = []
    for j, x in enumerate(sent):
        rows = x.shape[0] if x.dim() else 1
        sizes.append(x.numel() // max(rows, 1) * (splits[j][rank] if splits else rows // len(sent)))
    return list(itertools.accumulate(sizes))
