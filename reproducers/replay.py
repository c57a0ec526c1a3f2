"""Replay a capture op by op on a device and compare every op with a reference.

Differential, teacher-forced replay: the suspect device replays the whole log (so every op sees the
inputs it saw during the step); each op is also run on the reference from *the suspect's own inputs*
(upcast to float64 for `cpu64`), so rounding does not accumulate and the first op whose output
leaves the dtype-aware tolerance is the culprit, not one of its consumers.

References: `cpu64` (float64 on the CPU, tolerance per dtype), a device (`cpu`, `cuda:1`: same dtype,
bitwise), or `rank:N` (the device rank N's capture ran on, bitwise). Collectives are not recomputed
on one rank: their recorded post-wait outputs are substituted; when every rank's capture is present,
group_check.py checks each call against the exact result of every rank's inputs.

Simulation hook (testing reproducers on a CPU, which has no real bug): `inject=SPEC` applies a
probes/faults/ spec to the suspect's kernels. A fault's `after`/`count` number the matching calls
of the captured step, and are kept per original op: a shrunk case that keeps op #i sees the fault
exactly when op #i saw it during the step.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..probes import faults as faultmod
from ..probes.backends import backend_of, oracles
from . import format as fmt
from . import fused
from . import settings as st
from . import tolerance as tol
from .terms import CANCELLING

# Relative tolerance vs float64 per output dtype, scaled by (|ref| + rms(ref)) (for `SUMS`, by the op on
# |inputs| where that is larger): loose enough for any correct kernel's rounding (summation order, fused
# ops, TF32), far below a flipped exponent or high bit.
RTOL = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 1e-1, torch.float16: 2e-2}


def rtol_for(dtypes: Iterable[torch.dtype]) -> float | None:
    """The loosest RTOL of `dtypes`: an output's and its op's floating inputs' (a mixed-precision kernel
    may compute in its inputs' precision: CPU layer norm's backward on bfloat16 activations and float32
    weights rounds its float32 weight gradient's terms to bfloat16). None when none is a float RTOL knows."""
    return max((RTOL[d] for d in dtypes if d in RTOL), default=None)


MANTISSA = {torch.float32: 24, torch.float64: 53, torch.bfloat16: 8, torch.float16: 11}
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
    """The float64 math outputs of fused GPU op `name` (overload packet: attention, cuDNN batch norm) that
    the reference cannot run (None: another op, or one that cannot be rebuilt from its arguments)."""
    if name not in fused.STANDS_IN:
        return None
    try:
        return fused.fused_reference(name, list(ref_args), ref_kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None


def compare_op(func: Any, actual: torch.Tensor, ref: torch.Tensor, exact: bool, ref_args: Any,
               ref_kwargs: dict[str, Any], output: int, args: Any) -> Metric | None:
    """`compare`, with a sum's tolerance widened to the rounding its terms allow (`SUMS`; a norm's,
    softmax's or attention's backward: `terms.cancelling_terms`): computed only for an output the plain
    tolerance rejects (the wider one accepts whatever the plain one does). `args`: the op's arguments
    on the suspect, whose least precise floating input sets the tolerance where it is looser
    (`rtol_for`)."""
    rtol = rtol_for([actual.dtype, *(t.dtype for t in fmt.flat_tensors(args))])
    m = compare(actual, ref, exact, rtol=rtol)
    name = func.overloadpacket.__name__
    if m is None or exact or not (how := widening(name)):
        return m
    bound = tol.widened_scale(how, name, func, ref_args, ref_kwargs, output)
    return m if bound is None else compare(actual, ref, exact, magnitude=bound, rtol=rtol)


def widening(name: str) -> str | None:
    """How op `name`'s tolerance widens (`tolerance.widened_scale`): "sums", "terms" or None."""
    return "sums" if name in SUMS else "terms" if name in CANCELLING else None


def compare(actual: torch.Tensor, ref: torch.Tensor, exact: bool,
            magnitude: torch.Tensor | None = None, rtol: float | None = None) -> Metric | None:
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
                                          bad_indices=bad_positions(bad), message="integer/bool output differs")
    a64, r64 = a.double(), r.double()
    err = (a64 - r64).abs()
    if exact:
        bk = backend_of(a)
        bad = bk.bits(a) != bk.bits(r.to(a.dtype))
    else:
        bad = tol.outside_tolerance(a, r64, rtol or RTOL[a.dtype], magnitude)
    n = int(bad.sum())
    if n == 0:
        return None
    nonfinite = bool((~torch.isfinite(a64[bad]) & torch.isfinite(r64[bad])).any())
    e = err[bad]
    finite = e[torch.isfinite(e)]
    rel = (e / r64[bad].abs().clamp_min(1e-300))
    rel = rel[torch.isfinite(rel)]
    exp = torch.frexp(r64[bad].to(a.dtype).double().abs().clamp_min(torch.finfo(a.dtype).tiny)).exponent
    ulp = torch.ldexp(torch.ones_like(e), (exp - MANTISSA[a.dtype]).to(torch.int64))
    ulps = (e / ulp)[torch.isfinite(e / ulp)]
    mm = oracles.compare_bits(backend_of(a), r.to(a.dtype).reshape(-1)[bad.reshape(-1)],
                              a.reshape(-1)[bad.reshape(-1)], tensor="out")
    return Metric(cls="nonfinite" if nonfinite else "wrong",
                  max_abs=float(finite.max()) if finite.numel() else math.inf,
                  max_rel=float(rel.max()) if rel.numel() else math.inf,
                  max_ulp=float(ulps.max()) if ulps.numel() else math.inf,
                  bad=n, total=a.numel(), bad_indices=bad_positions(bad),
                  flipped_bits=dict(mm.bit_histogram) if mm else {})


def bad_positions(bad: torch.Tensor) -> list[list[int]]:
    return [list(map(int, ix)) for ix in torch.nonzero(bad)[: oracles.MAX_LISTED].tolist()]


# --- the simulated bad chip -------------------------------------------------------------------

@dataclass(slots=True)
class Simulation:
    """Which original ops a probes/faults/ spec hits (see the module docstring)."""

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


def unchecked_note(cap: fmt.Capture) -> str:
    """What a replay of `cap` cannot check, in words ("" when it checks every kernel the step ran)."""
    notes = []
    if cap.compiled_calls:
        notes.append(f"{cap.compiled_calls} torch.compile'd graph call(s) ran fused kernels outside the dispatcher: "
                     "their outputs are taken as recorded (inputs of the ops that read them), not checked; to check "
                     "them, capture the step again eagerly: capture(dir, eager=True), or the flight recorder's "
                     "recapture(..., eager=True)")
    if cap.unrecorded:
        notes.append(f"{cap.unrecorded} op(s) ran unrecorded, {cap.unrecorded_why}: "
                     "not checked; their outputs are taken as recorded (inputs of the ops that read them)")
    return "; ".join(notes)


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
                            m = compare_op(func, a, r, not upcast, ref_args, ref_kwargs, j,
                                           (args, list(kwargs.values())))
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
