"""Fault injection: make one worker's kernels misbehave, so users can prove their checks catch it.

Spec grammar (one fault per `--inject`, or several joined by ';'):

    KIND:key=value,key=value

    bitflip:rank=2,bit=20,rate=0.01   flip bit 20 of a fraction 0.01 of output elements
                                      (no rate: exactly one element per call)
    stuck:rank=0,bit=3,value=1        force bit 3 to `value` in a fraction `rate` (default 1e-3)
    nan:rank=0                        one output element becomes NaN (rate= for more)
    slow:rank=1,factor=1.3            every kernel takes `factor` times as long
    hang:rank=3                       the kernel never returns (the watchdog must end it)
    crash:rank=1                      the worker process dies (SIGKILL) inside the kernel

Common keys: `rank` (one rank, or several as 1|3), `probe` (only inside that probe),
`dtype` (only outputs of that dtype, e.g. bfloat16), `op` (aten op name, e.g. mm), `after`
(leave the first N matching calls alone: a chip that fails after warming up), `seed`,
`output` (which floating-point output of the op to corrupt, counting from 0; default the first:
e.g. `op=_scaled_dot_product_flash_attention_for_cpu_backward,output=2` hits dv of (dq, dk, dv)).
Value faults (bitflip, stuck, nan) also take `index` (the flat element index, within each
matching output, to hit on every call instead of random ones: a fixed, repeatable address, e.g.
`stuck:rank=1,bit=3,value=1,index=1000,op=clone,probe=memory` is a stuck cell at byte 4000 of
the memory probe's read-back; an index beyond the output leaves that output alone).
`count` corrupts at most N matching calls after `after` (one bad call: count=1). `at` says when a
value fault lands: `exit` corrupts the outputs when the code under test is left (the probe's
checks see them; the corruption's cost stays out of timing), `call` corrupts an output as its
kernel returns, so later kernels consume the bad bits, as on a real faulty chip. Without `at`,
faults land at `call` in the probes listed in `CALL_TIME_PROBES` (training steps: their backward
reads the forward's outputs, which are dead by the time the step is left) and at `exit` elsewhere.
Collectives: with `op=` naming a c10d op (`send`, `allreduce_`, `broadcast_`, `_allgather_base_`,
`_reduce_scatter_base_`, `alltoall_base_`; the coalesced `allreduce_coalesced_`,
`allgather_into_tensor_coalesced_`, `reduce_scatter_tensor_coalesced_`: their first tensor; `alltoall_`:
the tensor to rank 0), a value fault corrupts the *outgoing* payload before it leaves (a bad NIC or link), `slow` stretches the op, and `peer=N` limits a fault to sends to
rank N: `bitflip:rank=1,bit=12,op=send,peer=2,probe=links` corrupts only the link 1 -> 2.

`scope` says where a fault lives. `scope=probe` (the default): the injector is a TorchDispatchMode
entered only around each probe's code under test (the probe's own checks run outside it).
`scope=process`: like real silicon, the fault acts on every matching kernel the faulty rank's
worker process runs, from its first call to its last: model steps, tensor-parallel shards,
warm-ups, the checks' own kernels, reference computations in low precision, the local part of a
collective. Value faults then land as the kernel returns (`at=call`); `probe=` is refused with it.
`after_s=S` leaves every matching call alone for the first S seconds of the run (wall time since
the run began, across the run's worker processes, its retest included): a chip that throttles or
fails once it has run hot for a while (`slow:rank=1,factor=2,after_s=1.5,scope=process`).
`every=N` hits only every Nth matching call (a fault in every 2nd fp32 GEMM: `every=2,dtype=float32`).
`chance=P` makes the fault intermittent: a call it would hit is hit with probability P, drawn from a
generator seeded by `seed` that runs on across the whole process (every injector, every trial), so a
given sequence of calls fails the same way twice while trial after trial of one op fails k of n
times, as a marginal chip does (`bitflip:bit=25,op=mm,chance=0.25`).
`side=recv` (collective ops: c10d's, or JAX's `psum`, ...) corrupts what the rank *receives* instead of
what it sends: the op is waited for and its output corrupted, as a bad receive path would
(`bitflip:rank=2,bit=3,op=allreduce_,side=recv,scope=process`).
A bit index counts from the least significant bit of the output dtype (fp32: 0..31, sign 31;
bf16/fp16: 0..15); a bit beyond the dtype's width leaves that dtype alone (with `dtype=`, such a bit is
refused: the fault could never fire).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .backends.base import INT_BY_WIDTH

KINDS = ("bitflip", "stuck", "nan", "slow", "hang", "crash")
_KEYS = {
    "bitflip": {"bit", "rate", "index"},
    "stuck": {"bit", "rate", "value", "index"},
    "nan": {"rate", "index"},
    "slow": {"factor"},
    "hang": set(),
    "crash": set(),
}
_COMMON = {"rank", "probe", "dtype", "op", "after", "seed", "output", "count", "at", "peer", "scope", "every", "side",
           "after_s", "chance"}
SCOPES = ("probe", "process")
EPOCH_ENV = "CHIPCHECK_FAULT_EPOCH"
"""When the run began (time.time()), for `after_s`; the launcher sets it for its workers."""
# Probes whose code under test consumes its own kernels' outputs register here on import (see `at`).
CALL_TIME_PROBES: set[str] = set()
# The compute kernels a fault lands in by default: GEMMs and attention, not the checks' helpers.
DEFAULT_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_flash_attention_for_cpu", "convolution",
               # attention backward kernels (first output: dq), so faults also land in gradients
               "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
               "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward")


CHIP_FAULTS = {
    "bitflip-fp32-every-2nd": "bitflip:rank={r},bit=20,dtype=float32,every=2,scope=process",
    "bitflip-bf16": "bitflip:rank={r},bit=12,dtype=bfloat16,scope=process",
    "bitflip-fp16": "bitflip:rank={r},bit=12,dtype=float16,scope=process",
    "nan": "nan:rank={r},scope=process",
    "stuck-bit": "stuck:rank={r},bit=22,value=1,rate=0.01,scope=process",
    "warm-chip": "bitflip:rank={r},bit=20,after=200,scope=process",
    "recv-corrupt": "bitflip:rank={r},bit=3,op=allreduce_,side=recv,scope=process",
    "send-corrupt": "bitflip:rank={r},bit=3,op=allreduce_,scope=process",
}
"""What a bad chip does, as --inject specs for rank `{r}` (process scope: every kernel it runs): the
catalogue the blame tests and benchmarks/bench_blame.py cross with every default probe."""


class InjectSpecError(ValueError):
    """A malformed --inject spec (the CLI turns it into a one-line message and exit 2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    kind: str
    ranks: tuple[int, ...] | None = None
    bit: int | None = None
    rate: float | None = None
    value: int = 1
    factor: float = 1.0
    probe: str | None = None
    dtype: str | None = None
    op: str | None = None
    after: int = 0
    seed: int = 0
    index: int | None = None
    output: int | None = None
    count: int = 0  # matching calls corrupted after `after` (0: all)
    peer: int | None = None  # collectives: only sends to this rank
    at: str | None = None  # exit | call | None (by probe: CALL_TIME_PROBES)
    scope: str = "probe"  # probe: each probe's code under test; process: every kernel the rank runs
    every: int = 1  # hit every Nth matching call (after `after`)
    side: str = "send"  # c10d ops: corrupt what is sent, or what is received (recv)
    after_s: float = 0.0  # seconds of the run (since EPOCH_ENV) during which matching calls are spared
    chance: float = 1.0  # a call the fault would hit is hit with this probability (intermittent)

    def applies_to(self, rank: int, probe: str) -> bool:
        return (self.ranks is None or rank in self.ranks) and (self.probe is None or self.probe == probe)

    def spec(self) -> str:
        parts = []
        if self.ranks is not None:
            parts.append("rank=" + "|".join(str(r) for r in self.ranks))
        for k in ("bit", "rate", "index", "probe", "dtype", "op", "output"):
            v = getattr(self, k)
            if v is not None:
                parts.append(f"{k}={v}")
        if self.kind == "stuck":
            parts.append(f"value={self.value}")
        if self.kind == "slow":
            parts.append(f"factor={self.factor}")
        if self.after:
            parts.append(f"after={self.after}")
        if self.count:
            parts.append(f"count={self.count}")
        if self.at:
            parts.append(f"at={self.at}")
        if self.every > 1:
            parts.append(f"every={self.every}")
        if self.after_s:
            parts.append(f"after_s={self.after_s:g}")
        if self.chance < 1.0:
            parts.append(f"chance={self.chance:g}")
        if self.seed:
            parts.append(f"seed={self.seed}")
        if self.side != "send":
            parts.append(f"side={self.side}")
        if self.scope != "probe":
            parts.append(f"scope={self.scope}")
        return self.kind + (":" + ",".join(parts) if parts else "")


def unreachable(f: Fault, world: int, probes: Collection[str]) -> str:
    """Why fault `f` can never fire in a run of `world` ranks running `probes`; "" when it can. A typo in
    a rank, a probe or an op name would otherwise give a clean run that says nothing of it."""
    outside = [r for r in (*(f.ranks or ()), *(() if f.peer is None else (f.peer,))) if r >= world]
    if outside:
        ranks = "its only rank is 0" if world == 1 else f"its ranks are 0-{world - 1}"
        return f"rank {outside[0]} is not in this run ({ranks})"
    if f.probe is not None and f.probe not in probes:
        return f"probe {f.probe!r} is not in this run (it runs {', '.join(probes)})"
    if f.op is not None and not _known_op(f.op):
        return f"op {f.op!r} is no ATen or c10d operator (e.g. mm, addmm, _scaled_mm, allreduce_, send)"
    return ""


def _known_op(name: str) -> bool:
    """Is `name` an operator (overload packet) the injector can match: ATen's, c10d's or functional c10d's."""
    import torch
    import torch.distributed  # noqa: F401  (registers the c10d operators)

    return any(hasattr(getattr(torch.ops, ns), name) for ns in ("aten", "c10d", "_c10d_functional"))


def parse(spec: str) -> list[Fault]:
    """Parse one or more ';'-separated fault specs; raise InjectSpecError with a fix-it hint."""
    faults = []
    for one in (s.strip() for s in spec.split(";")):
        if one:
            faults.append(_parse_one(one))
    if not faults:
        raise InjectSpecError(f"empty --inject spec {spec!r}; e.g. bitflip:rank=0,bit=20")
    return faults


def _parse_one(spec: str) -> Fault:
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise InjectSpecError(f"unknown fault kind {kind!r} in --inject {spec!r}; known: {', '.join(KINDS)}")
    kw: dict[str, Any] = {"kind": kind}
    allowed = _KEYS[kind] | _COMMON
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not v:
            raise InjectSpecError(f"--inject {spec!r}: expected key=value, got {item!r}")
        if k not in allowed:
            raise InjectSpecError(f"--inject {spec!r}: key {k!r} is not valid for {kind}; valid: "
                                  f"{', '.join(sorted(allowed))}")
        try:
            kw.update(_convert(k, v))
        except ValueError as e:
            raise InjectSpecError(f"--inject {spec!r}: bad value for {k}: {v!r} ({e})") from None
    if kind in ("bitflip", "stuck") and kw.get("bit") is None:
        raise InjectSpecError(f"--inject {spec!r}: {kind} needs bit=N (0 = least significant)")
    width = _WIDTH.get(kw.get("dtype") or "", 64)
    if kind in ("bitflip", "stuck") and kw["bit"] >= width:  # it could never fire: the run would just pass
        raise InjectSpecError(f"--inject {spec!r}: {kw['dtype']} has bits 0..{width - 1}; bit={kw['bit']} "
                              "would never corrupt anything")
    if kind == "slow" and kw.get("factor", 1.0) <= 1.0:
        raise InjectSpecError(f"--inject {spec!r}: slow needs factor > 1, e.g. factor=1.3")
    if kind == "stuck" and kw.get("rate") is None:
        kw["rate"] = 1e-3
    if kw.get("scope") == "process" and kw.get("probe"):
        raise InjectSpecError(f"--inject {spec!r}: scope=process acts on every kernel of the rank; drop probe= "
                              "(or use scope=probe to fault one probe)")
    if kw.get("side") == "recv" and not kw.get("op"):
        raise InjectSpecError(f"--inject {spec!r}: side=recv needs a collective op, e.g. op=allreduce_")
    return Fault(**kw)


_WIDTH = {"float32": 32, "bfloat16": 16, "float16": 16, "float64": 64, "float8_e4m3fn": 8}
"""The dtypes `dtype=` accepts, with their bits per element."""


def _convert(k: str, v: str) -> dict[str, Any]:
    if k == "rank":
        ranks = tuple(int(x) for x in v.split("|"))
        if any(r < 0 for r in ranks):
            raise ValueError("ranks are >= 0")
        return {"ranks": ranks}
    if k == "count":
        if int(v) < 1:
            raise ValueError("count must be >= 1 (leave it out to corrupt every matching call)")
        return {"count": int(v)}
    if k == "at":
        if v not in ("exit", "call"):
            raise ValueError("at must be exit or call")
        return {"at": v}
    if k == "scope":
        if v not in SCOPES:
            raise ValueError(f"scope must be {' or '.join(SCOPES)}")
        return {"scope": v}
    if k == "side":
        if v not in ("send", "recv"):
            raise ValueError("side must be send or recv")
        return {"side": v}
    if k == "every":
        if int(v) < 1:
            raise ValueError("every must be >= 1")
        return {"every": int(v)}
    if k == "peer":
        if int(v) < 0:
            raise ValueError("peer is a rank >= 0")
        return {"peer": int(v)}
    if k in ("bit", "after", "seed", "value", "index", "output"):
        n = int(v)
        if n < 0 or (k == "output" and n > 15) or (k == "bit" and n > 63) or (k == "value" and n not in (0, 1)):
            raise ValueError("out of range")
        return {k: n}
    if k == "rate":
        r = float(v)
        if not 0.0 < r <= 1.0:
            raise ValueError("rate must be in (0, 1]")
        return {"rate": r}
    if k == "factor":
        return {"factor": float(v)}
    if k == "chance":
        c = float(v)
        if not 0.0 < c <= 1.0:
            raise ValueError("chance is a probability in (0, 1]")
        return {"chance": c}
    if k == "after_s":
        t = float(v)
        if not 0.0 <= t < float("inf"):
            raise ValueError("after_s is a number of seconds >= 0")
        return {"after_s": t}
    if k == "dtype":
        if v not in _WIDTH:
            *rest, last = _WIDTH
            raise ValueError(f"dtype must be {', '.join(rest)} or {last}")
        return {"dtype": v}
    return {k: v}


_DRAWS: dict[tuple[int, float], random.Random] = {}


def chance_draw(f: Fault) -> float:
    """The next draw of the fault's intermittency generator: one per (seed, chance), for the whole
    process, so trials of the same op do not all draw alike."""
    rng = _DRAWS.get((f.seed, f.chance))
    if rng is None:
        rng = _DRAWS[(f.seed, f.chance)] = random.Random(f"repro-chance:{f.seed}")
    return rng.random()


@dataclass(slots=True)
class FaultState:
    """Per-worker counters, so faults are deterministic per call."""

    calls: dict[int, int] = field(default_factory=dict)


def corrupt(fault: Fault, out: Any, call: int) -> None:
    """Apply a value fault to tensor `out` in place (bitflip / stuck / nan)."""
    import torch

    width = out.element_size() * 8
    if fault.kind in ("bitflip", "stuck") and (fault.bit is None or fault.bit >= width):
        return
    if not out.is_contiguous():
        # e.g. attention kernels return (b, h, s, d) views of (b, s, h, d) memory: walk it in memory order
        out = out.permute(*sorted(range(out.dim()), key=lambda d: -out.stride(d)))
    flat = out.view(-1)
    gen = torch.Generator(device="cpu").manual_seed((fault.seed * 1_000_003 + call) & 0x7FFFFFFF)
    n = flat.numel()
    if fault.index is not None:
        if fault.index >= n:
            return
        idx = torch.tensor([fault.index])
    elif fault.rate is None:
        idx = torch.randint(0, n, (1,), generator=gen)
    else:
        mask = torch.rand(n, generator=gen) < fault.rate
        idx = torch.nonzero(mask).reshape(-1)
        if idx.numel() == 0:
            return
    idx = idx.to(out.device)
    if fault.kind == "nan":
        flat[idx] = float("nan")
        return
    ints = flat.view(getattr(torch, INT_BY_WIDTH[out.element_size()]))  # a view: written through to `out`
    assert fault.bit is not None
    bit = 1 << fault.bit
    if bit >= 1 << (width - 1):  # the sign bit, as a signed integer of this width
        bit -= 1 << width
    if fault.kind == "bitflip":
        ints[idx] ^= bit
    elif fault.value:
        ints[idx] |= bit
    else:
        ints[idx] &= ~bit


def _busy_wait(seconds: float) -> None:
    """Busy-wait, not sleep: a slow chip keeps its core, and sleep overshoots short kernels."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


_NOT_SENT = ("wait_tensor", "_wrap_tensor_autograd")
"""Functional-collective ops that move nothing: the wait for a result, its autograd wrapper."""


def _with_first_input(args: Any, replacement: Any) -> tuple[Any, Any]:
    """A functional collective's arguments with its first input tensor replaced: (replacement, args)."""
    first = args[0]
    if isinstance(first, (list, tuple)):
        first = [replacement, *first[1:]]
    else:
        first = replacement
    return replacement, (first, *args[1:])


def _storage(t: Any) -> int:
    return int(t.untyped_storage().data_ptr())


_OUTPUTS_FIRST = ("allgather_into_tensor_coalesced_", "reduce_scatter_tensor_coalesced_", "alltoall_")
"""c10d's ops that take (outputs, inputs) tensor lists (the coalesced ones, alltoall's list form): the
payload sent is an input (alltoall_: the one to rank 0)."""


def fake_mode_active() -> bool:
    """Is a FakeTensorMode handling ops under the current one? (DTensor's sharding propagation runs
    each op on fake tensors first: nothing is computed, no bytes exist, no chip is involved.)"""
    import torch

    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def make_injector(faults: list[Fault], rank: int, probe: str) -> Any:
    """A context-manager factory that turns on these faults for one probe's code under test (or None).

    Only `scope=probe` faults: process-scope ones are already on for the whole worker."""
    return _injector([f for f in faults if f.scope == "probe" and f.applies_to(rank, probe)],
                     call_time=probe in CALL_TIME_PROBES)


def process_injector(faults: list[Fault], rank: int) -> Any:
    """A context-manager factory for the `scope=process` faults of this rank (or None): entered once
    around everything the worker computes, so the fault follows the chip, not a probe."""
    return _injector([f for f in faults if f.scope == "process" and f.applies_to(rank, "")], call_time=True)


def start_process_faults(faults: list[Fault], rank: int) -> Any:
    """Turn this rank's `scope=process` faults on for the rest of the worker's work; returns the
    function that turns them off (a no-op without such faults). A worker calls it once, before
    its first probe, and the off switch after its last, so no kernel of the rank escapes."""
    factory = process_injector(faults, rank)
    if factory is None:
        return lambda: None
    mode = factory()
    mode.__enter__()
    return lambda: mode.__exit__(None, None, None)


def _injector(active: list[Fault], *, call_time: bool) -> Any:
    if not active:
        return None
    from torch.utils._python_dispatch import TorchDispatchMode

    state = FaultState()
    epoch = float(os.environ.get(EPOCH_ENV) or time.time())
    now = {i for i, f in enumerate(active) if f.at == "call" or (f.at is None and call_time)}

    def _fire(f: Fault, i: int) -> int | None:
        """Count a matching call; None when this call is spared (after/count). Hang and crash act here."""
        if f.after_s and time.time() - epoch < f.after_s:
            return None
        n = state.calls.get(i, 0)
        state.calls[i] = n + 1
        if n < f.after or (n - f.after) % f.every or (f.count and n >= f.after + f.count * f.every):
            return None
        if f.chance < 1.0 and chance_draw(f) >= f.chance:
            return None
        if f.kind == "hang":
            while True:
                time.sleep(3600)
        if f.kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    class _Injector(TorchDispatchMode):
        """Value faults are applied when the code under test is left: the output tensors are the
        same objects the probe checks next, and the corruption's own cost stays out of timing."""

        @classmethod
        def ignore_compile_internals(cls) -> bool:
            # a bad chip runs compiled code as compiled: torch.compile would otherwise run the step
            # eagerly under this mode; the faults reach the ops its artifact calls (its GEMMs)
            return True

        def __enter__(self) -> Any:
            self.pending: list[tuple[Fault, Any, int]] = []
            # recv faults applied to an output that the backend may still overwrite with its own
            # copy (gloo's reduce-scatter lands its result with split + copy_ at the caller's wait)
            self.landing: list[tuple[Fault, Any, int]] = []
            # recv faults of point-to-point receives, applied once the caller has the data: waiting
            # inside the op would deadlock a batch (batch_isend_irecv starts its sends after it)
            self.arriving: list[tuple[Fault, Any, int]] = []
            return super().__enter__()

        def _arrive(self, only: Any = None) -> None:
            """Corrupt the received buffers (those sharing storage with `only`'s tensors, or all)."""
            keep = []
            for f, t, n in self.arriving:
                # the caller reads it (or leaves the code under test): it has waited for it. The op's
                # own work is not waited on: inside a batch it never completes (the batch's does)
                if only is None or _storage(t) in only:
                    corrupt(f, t, n)
                else:
                    keep.append((f, t, n))
            self.arriving = keep

        def __exit__(self, *exc: Any) -> Any:
            if self.arriving:
                self._arrive()
            out = super().__exit__(*exc)
            for f, t, n in self.pending:
                corrupt(f, t, n)
            self.pending.clear()
            return out

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if self.arriving and func.namespace != "c10d":
                import torch
                from torch.utils._pytree import tree_leaves

                read = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                if any(_storage(t) in read for _, t, _ in self.arriving):
                    self._arrive(read)
            if self.landing:
                if name == "copy_" and any(args[0].data_ptr() == t.data_ptr() for _, t, _ in self.landing):
                    out = func(*args, **kwargs)
                    for lf, lt, ln in self.landing:
                        corrupt(lf, lt, ln)  # what arrived is damaged, whichever copy delivered it
                    self.landing.clear()
                    return out
                if name != "split":  # the backend's copy comes right after the op, or never
                    self.landing.clear()
            mine = [f for f in active if (f.op == name if f.op else name in DEFAULT_OPS)]
            if not mine or fake_mode_active():  # a fake op computes nothing: nothing to corrupt or count
                return func(*args, **kwargs)
            if func.namespace == "c10d" or (func.namespace == "_c10d_functional" and name not in _NOT_SENT):
                return self._collective(func, name, mine, args, kwargs)
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            tensors = out if isinstance(out, (tuple, list)) else (out,)
            floats = [t for t in tensors if hasattr(t, "dtype") and t.is_floating_point()]
            for f in mine:
                i = active.index(f)
                k = f.output or 0
                first = floats[k] if k < len(floats) else None  # the output this fault targets
                if first is None and f.output is not None:
                    continue  # the op has no such output: leave it alone
                if first is not None and f.dtype and str(first.dtype).removeprefix("torch.") != f.dtype:
                    continue
                n = _fire(f, i)
                if n is None:
                    continue
                if f.kind == "slow":
                    if first is not None and first.device.type == "cuda":
                        import torch

                        torch.cuda.synchronize(first.device)
                    _busy_wait((time.perf_counter() - t0) * (f.factor - 1.0))
                elif first is not None and i in now:
                    corrupt(f, first, n)
                elif first is not None:
                    self.pending.append((f, first, n))
            return out

        def _collective(self, func: Any, name: str, mine: list[Fault], args: Any, kwargs: Any) -> Any:
            """c10d ops (send, allreduce_, ...): a value fault corrupts the *outgoing* payload before
            it leaves, as a bad NIC or link would (`peer` limits it to sends to one rank), or with
            `side=recv` what arrives: the op is waited for and its output corrupted."""
            import torch

            functional = func.namespace == "_c10d_functional"
            if functional:  # out of place: (input or inputs, ...); what arrives is the result
                first = args[0]
                sent, got = (first if isinstance(first, torch.Tensor) else first[0] if first else None), None
            elif name.endswith("_base_"):  # (output, input)
                sent, got = args[1], args[0]
            elif name in _OUTPUTS_FIRST:  # (outputs, inputs): the first tensor of each
                sent, got = (args[1][0] if args[1] else None), (args[0][0] if args[0] else None)
            else:
                sent = got = args[0][0] if args and args[0] else None
            while isinstance(got, (list, tuple)):  # allgather_: a list of outputs per input
                got = got[0] if got else None
            t0 = time.perf_counter()
            slow = 1.0
            fired = False
            late: list[tuple[Fault, int]] = []
            for f in mine:
                if f.peer is not None and (name != "send" or len(args) < 3 or args[2] != f.peer):
                    continue
                n = _fire(f, active.index(f))
                if n is None:
                    continue
                if f.kind == "slow":
                    slow = max(slow, f.factor)
                elif f.side == "recv":
                    late.append((f, n))
                elif sent is not None:
                    if functional and not fired and not name.endswith("_"):
                        # out of place: a NIC corrupts what leaves, not the memory it left from
                        sent, args = _with_first_input(args, sent.clone())
                    fired = True
                    corrupt(f, sent, n)
            out = func(*args, **kwargs)
            if functional:
                got = out if isinstance(out, torch.Tensor) else out[0] if out else None
                if late and got is not None:
                    got = torch.ops._c10d_functional.wait_tensor.default(got)
            if late and got is not None and name == "recv_":
                self.arriving.extend((f, got, n) for f, n in late)
                late = []
            if late and got is not None:
                for w in (out if isinstance(out, (tuple, list)) else (out,)):
                    if hasattr(w, "wait"):
                        w.wait()
                for f, n in late:
                    corrupt(f, got, n)
                self.landing = [(f, got, n) for f, n in late]
            if slow > 1.0:
                _busy_wait((time.perf_counter() - t0) * (slow - 1.0))
            return out

    return _Injector
