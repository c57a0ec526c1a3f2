"""Capture: record every ATen op of an eager step, so it can be replayed and shrunk off-line.

`with capture("out/cap"):` around a step (forward, backward, optimizer, collectives), on every rank.
A TorchDispatchMode sees each ATen call with its real arguments: we log the overload, the arguments
(tensors by identity), every output's shape/stride/dtype/device/storage and an XXH3 fingerprint of
its bytes. Only tensors that no recorded op produced (parameters, the batch) have their bytes saved,
plus the outputs of random ops and of collectives: everything else replay recomputes.

Collectives: c10d ops (`c10d.allreduce_.default`, ...) run asynchronously; when the dispatch mode
sees them return, the reduction may not have finished, so a naive recorder logs the value before
the reduction. We keep them pending and snapshot their outputs after `work.wait()` at the next op
boundary (or when the capture is left): the value later ops consumed. Functional collectives
(`_c10d_functional.*`) are snapshotted when their result is first consumed (after `wait_tensor`).

Order with fault injection (tests): enter the injector first, then `capture`, so the recorder is the
top mode and fingerprints what the kernel (and the simulated bad chip) returned.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType, TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..probes.faults import fake_mode_active
from . import format as fmt
from . import settings as bitset

# Ops that are bookkeeping, not computation: executed, never recorded (replay has nothing to redo).
_SKIP_NAMESPACES = ("profiler",)
_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(slots=True)
class _Pending:
    """A collective whose outputs are not final until its work completes."""

    slot: int
    func: Any
    args: list[Any]
    kwargs: dict[str, Any]
    outs: list[Any]
    work: Any
    in_fps: list[str]
    info: dict[str, Any]
    stack: list[str] = field(default_factory=list)


def environment() -> dict[str, Any]:
    """The software around the step (the bundle adds the chip's NVML view)."""
    env: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0],
                           "os": platform.platform(), "host": platform.node(), "machine": platform.machine(),
                           "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}
    if torch.cuda.is_available():
        env.update({"cuda": torch.version.cuda, "cudnn": str(torch.backends.cudnn.version()),
                    "cublas": torch.version.cuda,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version()))})
    return env


class Recorder(TorchDispatchMode):
    """The dispatch mode behind `capture`; one per rank and step."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Under a plain dispatch mode torch.compile runs the step eagerly, which computes other bits
        # than the compiled kernels (capture would change the step). With this, the compiled artifact
        # runs as compiled: the recorder sees the ops it calls through the dispatcher (its GEMMs), and
        # a fused kernel's outputs are recorded as inputs of the ops that read them.
        return True

    def __init__(self, root: Path, rank: int, world: int, stacks: bool = True):
        super().__init__()
        self.root, self.rank, self.world, self.stacks = root, rank, world, stacks
        self.vids = _Identities()
        self.storages: dict[tuple[Any, int], tuple[int, Any, int]] = {}  # key -> (storage id, weakref, vid)
        self.ops: list[fmt.OpRecord | None] = []
        self.saved: dict[int, tuple[fmt.TensorMeta, Future[str]]] = {}  # vid -> (meta, its blob's digest)
        self.recorded: list[tuple[int, list[Future[str] | str]]] = []  # (op slot, its outputs' blobs)
        self.blobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chipcheck-capture-blobs")
        self.pending: list[_Pending] = []
        self.device = "cpu"
        self._next_vid = 0
        self._next_storage = 0
        self.unrecorded = 0
        """Ops that ran on what capture cannot record (`_opaque`); `unrecorded_why` names the first."""
        self.unrecorded_why = ""
        self.unwritten: set[int] = set()
        """Storages an allocation made (`aten.empty`, ...) that no recorded op has written yet: their bytes
        are whatever memory held, or what code outside the dispatcher wrote there (DDP fills its bucket
        indices through a raw pointer); replay cannot rebuild either."""

    # --- identity ---------------------------------------------------------------------------
    def _new_vid(self, t: torch.Tensor) -> int:
        vid = self._next_vid
        self._next_vid += 1
        self.vids[t] = vid
        return vid

    def _storage_id(self, t: torch.Tensor, vid: int) -> tuple[int, int | None]:
        """(storage id, vid of a live tensor already holding that storage, if any)."""
        st = t.untyped_storage()
        if st.nbytes() == 0:
            self._next_storage += 1
            return self._next_storage, None
        # The storage itself (its StorageImpl), not its address: FSDP frees a parameter's storage
        # (resize to 0) and the allocator hands that address to a new storage, which its address
        # would make an alias of the freed one's tensor (read back as a stale `as_strided` of it).
        key = (t.device, st._cdata)
        known = self.storages.get(key)
        if known is not None and known[1]() is not None:
            return known[0], known[2]
        self._next_storage += 1
        self.storages[key] = (self._next_storage, weakref.ref(t), vid)
        return self._next_storage, None

    def _alias_offset(self, t: torch.Tensor, base: int) -> int | None:
        """The storage offset that makes `t` an `as_strided` of tensor `base` in replay, or None when
        replay could not rebuild it that way (then `t` is saved as bytes: faithful values, lost aliasing).

        Replay rebuilds a saved tensor in a storage of its own extent at offset 0, and an op's output
        as the op made it; so `t` must lie inside the elements `base` itself spans. A gradient-bucket
        view (DDP) or an all-gather buffer (FSDP) that outgrew the first tensor seen on its storage
        does not, and an `as_strided` of it would read out of bounds."""
        known = next((v for v in self.storages.values() if v[2] == base), None)
        b = known[1]() if known is not None else None
        if b is None or b.dtype != t.dtype:
            return None
        lo, hi = _span(t)
        blo, bhi = _span(b)
        if lo < blo or hi > bhi:
            return None
        return int(t.storage_offset() - b.storage_offset() if base in self.saved else t.storage_offset())

    def meta(self, t: torch.Tensor, storage: int) -> fmt.TensorMeta:
        return fmt.TensorMeta(shape=list(t.shape), stride=list(t.stride()), dtype=_name(t.dtype),
                              device=_name(t.device), storage_offset=int(t.storage_offset()), storage=storage)

    def _external(self, t: torch.Tensor) -> int:
        """A tensor no recorded op produced: save its bytes, or express it as a view of a known storage
        (so a replayed in-place write through one view shows through the other, as it did live)."""
        vid = self._new_vid(t)
        sid, base = self._storage_id(t, vid)
        m = self.meta(t, sid)
        if t.device.type != "cpu":
            self.device = str(t.device)
        offset = self._alias_offset(t, base) if base is not None and base != vid else None
        if offset is not None:
            args = [{"t": base}, list(t.shape), list(t.stride()), offset]
            self.ops.append(fmt.OpRecord(index=len(self.ops), op="aten.as_strided.default", args=args, kwargs={},
                                         outputs=[vid], out_meta=[m], fingerprints=[fmt.fingerprint(t)]))
            return vid
        self.saved[vid] = (m, self._put(t))
        return vid

    def encode(self, x: Any) -> Any:
        """An argument as JSON; tensors first seen here become saved inputs."""
        if isinstance(x, torch.Tensor):
            x = _unwrap_async(x)
            vid = self.vids.get(x)
            return {"t": self._external(x) if vid is None else vid}
        if isinstance(x, (list, tuple)):
            return [self.encode(v) for v in x]
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if x == x and abs(x) != float("inf") else {"float": repr(x)}
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {"device": str(x)}
        if isinstance(x, torch.layout):
            return {"layout": str(x).removeprefix("torch.")}
        if isinstance(x, torch.memory_format):
            return {"memory_format": str(x).removeprefix("torch.")}
        if isinstance(x, torch.ScriptObject):
            return {"script_object": str(x._type().qualified_name()).rsplit(".", 1)[-1]}
        return {"opaque": type(x).__name__}

    # --- recording --------------------------------------------------------------------------

    def _outputs(self, out: Any, reuse: bool = True) -> tuple[list[int | None], list[fmt.TensorMeta | None], list[Any]]:
        items = list(out) if isinstance(out, (tuple, list)) else [out]
        flat: list[Any] = []
        for x in items:  # ops like split return a list of tensors: one output each
            flat.extend(x if isinstance(x, (list, tuple)) else [x])
        vids: list[int | None] = []
        metas: list[fmt.TensorMeta | None] = []
        tensors = []
        for x in flat:
            if isinstance(x, torch.Tensor):
                vid = self.vids.get(x) if reuse else None
                if vid is None:
                    vid = self._new_vid(x)
                sid, _ = self._storage_id(x, vid)
                vids.append(vid)
                metas.append(self.meta(x, sid))
                tensors.append(x)
            else:
                vids.append(None)
                metas.append(None)
                tensors.append(x)
        return vids, metas, tensors

    def _stack(self) -> list[str]:
        """The innermost user frames (cheap: a frame walk, not traceback formatting)."""
        if not self.stacks:
            return []
        out: list[str] = []
        f: FrameType | None = sys._getframe(2)
        while f is not None and len(out) < 3:
            code = f.f_code
            if _is_user(code):
                out.append(f"{code.co_filename}:{f.f_lineno}:{code.co_name}")
            f = f.f_back
        return out

    def flush(self) -> None:
        """Snapshot pending collectives after their work completed."""
        for p in self.pending:
            p2p = fmt.is_p2p(_name(p.func))
            if p.work is not None and not p2p:
                p.work.wait()
            outs = [_wait_functional(o) if isinstance(o, torch.Tensor) else o for o in p.outs]
            if not p2p and outs and outs[0] is not None and outs[0].device.type == "cuda":
                torch.cuda.synchronize(outs[0].device)
            vids, metas, _ = self._outputs(outs)
            self.unwritten.difference_update(m.storage for m in metas if m is not None)
            fps = [fmt.fingerprint(o) if isinstance(o, torch.Tensor) else "" for o in outs]
            self.recorded.append((p.slot, [self._put(o) if isinstance(o, torch.Tensor) else "" for o in outs]))
            if p.work is not None and p2p:
                # A send's or receive's work is neither waited for nor synchronized: gloo's p2p work
                # waits for one *more* completion per wait(), so a second wait (after the user's own:
                # dist.send/recv wait inside) hangs the step, and a device synchronize behind an irecv
                # whose send the peer makes only after this rank's next send deadlocks both. A received
                # tensor is thus recorded as it is at the next op: final after dist.recv, possibly not
                # after an irecv the user has not waited for. Replay compares what arrived with what was
                # sent only when the work had completed once its bytes were copied (on CUDA the copy is
                # ordered after the user's wait, so a waited NCCL receive has completed by then).
                p.info["complete"] = _completed(p.work)
                if p.info["complete"] and _name(p.func).split(".")[1] == "recv_any_source_":
                    p.info["source"] = _source_rank(p.work)  # which group rank it came from, known once landed
            self.ops[p.slot] = fmt.OpRecord(
                index=p.slot, op=str(p.func), args=p.args, kwargs=p.kwargs, outputs=vids, out_meta=metas,
                fingerprints=fps, in_fingerprints=p.in_fps, substituted=True, collective=p.info,
                stack=p.stack)
        self.pending.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = _kind(func)
        if kind == "skip" or fake_mode_active():  # bookkeeping; ops on fake tensors (no bytes, no chip)
            return func(*args, **kwargs)
        if any(_is_subclass(t) for t in types if t is not torch.Tensor):
            # DTensor (FSDP2, TP), AsyncCollectiveTensor, ...: let the subclass run first; it re-dispatches
            # on its plain local tensors, which is what a chip computes and what we record.
            return NotImplemented
        if self.pending:
            self.flush()
        if kind != "collective" and (why := _opaque(args, kwargs)):  # (c10d's process group is its own)
            return self._unrecorded(func, args, kwargs, func(*args, **kwargs), why)
        if kind == "wrap":
            out = func(*args, **kwargs)
            vid = self.vids.get(args[0])
            if vid is not None:
                self.vids[out] = vid  # the async wrapper is the same value as the raw collective output
            return out
        args = [_unwrap_async(a) if isinstance(a, torch.Tensor) else a for a in args]
        if self.unwritten and kind == "compute":
            self._read_unwritten(func, args, kwargs)
        enc_args = self.encode(list(args))
        enc_kwargs = {k: self.encode(v) for k, v in kwargs.items()}
        if kind == "collective":
            return self._collective(func, args, kwargs, enc_args, enc_kwargs)
        out = func(*args, **kwargs)
        if why := _opaque(out):
            return self._unrecorded(func, args, kwargs, out, why)
        seeded = _seeded(func, args, kwargs)
        vids, metas, tensors = self._outputs(out)
        if kind == "compute":
            self._wrote(func, args, kwargs, metas)
        # a view computes nothing: its bytes are its base's, fingerprinted where they were made; an
        # allocation's bytes are whatever memory held (replay does not compare them)
        fps = ([""] * len(tensors) if kind == "view" or _allocates(func) else
               [fmt.fingerprint(t) if isinstance(t, torch.Tensor) else "" for t in tensors])
        if seeded:
            self.recorded.append((len(self.ops), [self._put(t) if isinstance(t, torch.Tensor) else "" for t in tensors]))
        self.ops.append(fmt.OpRecord(index=len(self.ops), op=_name(func), args=enc_args, kwargs=enc_kwargs,
                                     outputs=vids, out_meta=metas, fingerprints=fps, substituted=seeded,
                                     stack=self._stack()))
        return out

    def _unrecorded(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any, why: str) -> Any:
        """An op on what capture cannot record (tensors without strides, a packed weight): it ran, and is
        not recorded. Its strided outputs become saved inputs of the ops that read them (as a compiled
        kernel's do), and what it wrote in place is read back as bytes by the next op that reads it:
        replay checks every op around it, and says this one was not checked."""
        self.unrecorded += 1
        if not self.unrecorded_why:
            self.unrecorded_why = f"op #{len(self.ops)} {_name(func)} (the first) works on {why}"
        self.unwritten.update(sid for t in _written(func, args, kwargs)
                              if not _opaque(t) and (sid := self._known_storage(t)) is not None)
        return out

    def _read_unwritten(self, func: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
        """An op about to read memory no recorded op wrote: its bytes become a saved input (as read), so
        replay reads what the live op read rather than fresh uninitialised memory."""
        positions, names = _written_args(func, only=True)
        read = [a for i, a in enumerate(args) if i not in positions] + [v for k, v in kwargs.items() if k not in names]
        for t in fmt.flat_tensors(read):
            known = self.vids.get(t)
            if known is not None and known not in self.saved and self._known_storage(t) in self.unwritten:
                vid = self._new_vid(t)
                sid, _ = self._storage_id(t, vid)
                self.saved[vid] = (self.meta(t, sid), self._put(t))

    def _wrote(self, func: Any, args: list[Any], kwargs: dict[str, Any], metas: list[fmt.TensorMeta | None]) -> None:
        """Keep `unwritten` current: an allocation adds its storage; an op's outputs and the arguments
        its schema writes (`out=`, `Tensor(a!)`) take theirs off."""
        if _allocates(func):
            self.unwritten.update(m.storage for m in metas if m is not None)
            return
        if not self.unwritten:
            return
        self.unwritten.difference_update(m.storage for m in metas if m is not None)
        self.unwritten.difference_update(self._known_storage(t) for t in _written(func, args, kwargs))

    def _known_storage(self, t: torch.Tensor) -> int | None:
        """The storage id already given to `t`'s storage (None when none was)."""
        known = self.storages.get((t.device, t.untyped_storage()._cdata))
        return known[0] if known is not None else None

    def _collective(self, func: Any, args: list[Any], kwargs: dict[str, Any], enc_args: Any,
                    enc_kwargs: Any) -> Any:
        if func is torch.ops._c10d_functional.wait_tensor.default:
            return func(*args, **kwargs)  # completes a functional collective recorded when it was issued
        ins = fmt.flat_tensors(args)
        in_fps = [fmt.fingerprint(t) for t in ins]
        info = _group_info(func, args)
        out = func(*args, **kwargs)
        if func.namespace == "c10d":
            # (tensors, work) or a bare work: the tensors written are the op's tensor arguments
            work = out[-1] if isinstance(out, tuple) else out
            outs = fmt.flat_tensors(args[0])  # what a c10d op writes: its output (list) or in-place tensors
        else:  # functional: out of place, one tensor or (coalesced) a list of them
            work, outs = None, list(out) if isinstance(out, (list, tuple)) else [out]
        slot = len(self.ops)
        self.ops.append(None)
        self.pending.append(_Pending(slot=slot, func=func, args=enc_args, kwargs=enc_kwargs, outs=outs, work=work,
                                     in_fps=in_fps, info=info, stack=self._stack()))
        return out

    def _put(self, t: torch.Tensor) -> Future[str]:
        """The tensor's bytes to the blob store, off the step's thread: the step pays for one host copy
        (it may overwrite `t` in place next: an optimizer's parameters do); hashing and writing run
        beside it, and a write that fails (a full disk) is raised by `finish`, after the step."""
        data = fmt.tensor_bytes(t)
        return self.blobs.submit(fmt.put_blob, self.root, data)

    def finish(self, compiled_calls: int = 0, eager: bool = False) -> fmt.Capture:
        self.flush()
        self.blobs.shutdown(wait=True)
        try:
            tensors = {vid: fmt.TensorRef(vid=vid, meta=m, sha256=f.result()) for vid, (m, f) in self.saved.items()}
            for slot, blobs in self.recorded:
                rec = self.ops[slot]
                if rec is not None:
                    self.ops[slot] = dataclasses.replace(
                        rec, recorded=[b.result() if isinstance(b, Future) else b for b in blobs])
        except OSError as e:
            raise fmt.CaptureError(f"{self.root}: the capture's tensors could not be written ({e})") from None
        ops = [o for o in self.ops if o is not None]
        cap = fmt.Capture(rank=self.rank, world=self.world, device=self.device, ops=ops, tensors=tensors,
                          env=environment(), settings=bitset.current(), root=self.root, fingerprint=fmt.FINGERPRINT,
                          compiled_calls=compiled_calls, eager=eager, unrecorded=self.unrecorded,
                          unrecorded_why=self.unrecorded_why)
        fmt.save(cap)
        return cap


class _Identities:
    """Tensor object -> vid, by identity, without keeping the tensor alive (WeakIdKeyDictionary's job,
    at a tenth of its cost per lookup: this runs for every argument of every op of the step)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, int]] = {}

    def get(self, t: torch.Tensor) -> int | None:
        e = self._by_id.get(id(t))
        return e[1] if e is not None and e[0]() is t else None  # a dead tensor's id may be reused

    def __setitem__(self, t: torch.Tensor, vid: int) -> None:
        self._by_id[id(t)] = (weakref.ref(t), vid)


_PLAIN_DISPATCH = (torch.Tensor.__torch_dispatch__, torch._C._disabled_torch_dispatch_impl)
# Per-op facts below never change and are cached (functools.cache): str(func), str(dtype), a code
# object's origin, a schema's dropout argument. Each costs a few microseconds, times every op of a step.


def _opaque(*xs: Any) -> str:
    """What among `xs` capture can neither describe nor save, "" when nothing is: a tensor without
    strides (nested, sparse, ...) or a TorchScript object (a quantized or prepacked weight)."""
    for x in xs:
        if isinstance(x, torch.Tensor):
            if x.is_nested:
                return "a nested tensor"
            if x.layout is not torch.strided:
                return f"a {str(x.layout).removeprefix('torch.')} tensor"
        elif isinstance(x, torch.ScriptObject):
            return f"a packed {str(x._type().qualified_name()).rsplit('.', 1)[-1]}"
        elif isinstance(x, (list, tuple)):
            if why := _opaque(*x):
                return why
        elif isinstance(x, dict):
            if why := _opaque(*x.values()):
                return why
    return ""


@functools.cache
def _is_user(code: CodeType) -> bool:
    """Code outside torch and this package: the frames a stack names."""
    return not code.co_filename.startswith(_TORCH_DIR) and not code.co_filename.startswith(_HERE)


@functools.cache
def _kind(func: Any) -> str:
    """How the recorder treats an op: skip (bookkeeping), wrap (a functional collective's autograd
    wrapper: same value), collective, view (recorded, not fingerprinted), or compute."""
    if func.namespace in _SKIP_NAMESPACES:
        return "skip"
    if func is torch.ops._c10d_functional._wrap_tensor_autograd.default:
        return "wrap"
    if func.namespace in ("c10d", "_c10d_functional"):
        return "collective"
    return "view" if func.is_view else "compute"


@functools.cache
def _name(x: Any) -> str:
    """str() of an op overload, dtype or device, without the `torch.` prefix."""
    return str(x).removeprefix("torch.")


@functools.cache
def _is_subclass(t: type) -> bool:
    """A tensor subclass with its own __torch_dispatch__ (not a plain tensor or a Parameter)."""
    return getattr(t, "__torch_dispatch__", torch.Tensor.__torch_dispatch__) not in _PLAIN_DISPATCH


@functools.cache
def _allocates(func: Any) -> bool:
    """An op whose output holds whatever memory held (`format.ALLOCATIONS`)."""
    return func.namespace == "aten" and func.overloadpacket.__name__ in fmt.ALLOCATIONS


_OVERWRITES = frozenset({"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_", "exponential_",
                         "geometric_", "cauchy_", "log_normal_"})
"""In-place ops that do not read what they overwrite (an in-place `add_` reads its `self`)."""


@functools.cache
def _written_args(func: Any, only: bool = False) -> tuple[frozenset[int], frozenset[str]]:
    """Positions and names of the arguments the op's schema says it writes (`Tensor(a!)`); `only`: of
    those whose old bytes it does not read (`out=`, the `self` of a copy or fill)."""
    overwrites = func.overloadpacket.__name__ in _OVERWRITES
    written = [(i, a.name) for i, a in enumerate(func._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write
               and (not only or a.kwarg_only or overwrites)]
    return frozenset(i for i, _ in written), frozenset(n for _, n in written)


def _written(func: Any, args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors of this call that its schema says it writes (`_written_args`)."""
    positions, names = _written_args(func)
    return fmt.flat_tensors([a for i, a in enumerate(args) if i in positions]
                            + [v for k, v in kwargs.items() if k in names])


@functools.cache
def _seeded_facts(func: Any) -> tuple[bool, int, Any]:
    """(tagged nondeterministic_seeded, index of its dropout_p argument or -1, that argument's default)."""
    i, default = next(((i, a.default_value) for i, a in enumerate(func._schema.arguments)
                       if a.name == "dropout_p"), (-1, None))
    return torch.Tag.nondeterministic_seeded in func.tags, i, default


def _seeded(func: Any, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Does this call consume the RNG? Attention kernels carry the seeded tag for their dropout; with
    dropout_p == 0 they are plain compute (and a fault target), so replay must recompute them."""
    tagged, i, default = _seeded_facts(func)
    if not tagged:
        return False
    if i < 0:
        return True
    return bool(kwargs.get("dropout_p", args[i] if i < len(args) else default))


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] storage element `t` addresses."""
    lo = int(t.storage_offset())
    return lo, lo + int(sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True) if n > 1))


def _unwrap_async(t: Any) -> Any:
    """An AsyncCollectiveTensor as the raw tensor its collective wrote (waiting for it first)."""
    elem = getattr(t, "elem", None)
    if elem is not None and type(t).__name__ == "AsyncCollectiveTensor":
        return t.trigger_wait()
    return t


def _wait_functional(t: torch.Tensor) -> torch.Tensor:
    """A functional collective's output after its work completed (a no-op for c10d outputs)."""
    return torch.ops._c10d_functional.wait_tensor.default(t)


def _completed(work: Any) -> bool:
    """Has a c10d op's work (a boxed `Work`, as a dispatch mode sees it) completed? False when it
    cannot tell: a capture never breaks the step, and an unknown receive is only left unjudged."""
    import torch.distributed as dist

    try:
        return bool(dist.Work.unbox(work).is_completed() if isinstance(work, torch.ScriptObject)
                    else work.is_completed())
    except (RuntimeError, AttributeError, TypeError):
        return False


def _source_rank(work: Any) -> int | None:
    """The group rank a completed receive from any source came from (None when the backend cannot say:
    the receive is then left unjudged)."""
    import torch.distributed as dist

    try:
        w = dist.Work.unbox(work) if isinstance(work, torch.ScriptObject) else work
        return int(w._source_rank())
    except (RuntimeError, AttributeError, TypeError):
        return None


REDUCE_OPS = {0: "sum", 1: "avg", 2: "product", 3: "min", 4: "max", 5: "band", 6: "bor", 7: "bxor", 8: "premul_sum"}
"""c10d's RedOpType values."""


def _group_info(func: Any, args: list[Any]) -> dict[str, Any]:
    """Group name, its global ranks, this rank and the world size (what a multi-rank repro needs)."""
    import torch.distributed as dist

    info: dict[str, Any] = {"group": "", "ranks": [], "rank": 0, "world": 1, "reduce_op": "sum"}
    try:
        if func.namespace == "c10d":
            pg = next(a for a in args if isinstance(a, torch.ScriptObject)
                      and "ProcessGroup" in str(a._type().qualified_name()))
            group = dist.ProcessGroup.unbox(pg)
            red = [a for a in args if isinstance(a, torch.ScriptObject) and "ReduceOp" in str(a._type().qualified_name())]
            if red:  # c10d's ReduceOp is opaque to a dispatch mode but for its `op()` (RedOpType's value)
                code = int(getattr(red[0], "op")())  # noqa: B009 - a TorchScript method mypy cannot see
                info["reduce_op"] = REDUCE_OPS.get(code, f"op{code}")
        else:
            from torch.distributed.distributed_c10d import _resolve_process_group

            group = _resolve_process_group(args[-1])
            info["reduce_op"] = args[1] if isinstance(args[1], str) else "sum"
        info.update(group=group.group_name, ranks=list(dist.get_process_group_ranks(group)), rank=group.rank(),
                    world=group.size())
    except (StopIteration, RuntimeError, ValueError, AttributeError, TypeError, IndexError):
        pass  # recorded without group details (never breaks the step); single-rank replay substitutes the outputs
    return info


class capture:  # noqa: N801 - used as `with capture(dir):`, like a function
    """Record the ATen ops of the enclosed eager step into `root` (on every rank).

    The rank and world size come from torch.distributed when it is initialised. On exit the op log
    is written to `root/rank<R>/capture.json` and inputs to `root/blobs/`; `.result` holds the
    `format.Capture`.

    `eager=True` sets torch.compile aside for the step (`torch.compiler.set_stance("force_eager")`):
    a compiled model's fused kernels then run as the ATen ops they fuse, each recorded and checked by
    replay, where a compiled capture sees only their outputs. The kernels are the eager ones (other bits
    than the compiled step's); a chip's fault in the math they share shows in both.
    """

    def __init__(self, root: str | Path, *, rank: int | None = None, stacks: bool = True, eager: bool = False):
        import torch.distributed as dist

        self.root = Path(root)
        live = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if live else 0)
        self.world = dist.get_world_size() if live else 1
        self.stacks = stacks
        self.eager = eager
        self.result: fmt.Capture | None = None
        self._mode: Recorder | None = None
        self._compiled: CompiledCalls | None = None
        self._stance: Any = None

    def __enter__(self) -> capture:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.eager:
            self._stance = torch.compiler.set_stance("force_eager")  # in force from this call; __exit__ puts it back
        try:
            self._mode = Recorder(self.root, self.rank, self.world, self.stacks)
            self._compiled = CompiledCalls()
            self._mode.__enter__()
        except BaseException:
            # __exit__ never runs for a with-statement whose __enter__ raised: undo here what it would
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None
        if self._compiled is not None:
            self._compiled.stop()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        assert self._mode is not None
        mode = self._mode
        mode.__exit__(et, ev, tb)
        calls = self._compiled.stop() if self._compiled else 0
        self._compiled = None
        self._restore()
        # A step that crashed is still worth keeping: the ops up to the crash are the reproducer.
        self.result = mode.finish(calls, self.eager)


class CompiledCalls:
    """Counts the torch.compile'd (inductor) graphs run from now until `stop`, by inductor's own record of
    graph executions (`torch._inductor.debug`): their fused kernels run outside the dispatcher, so a
    capture must say that it saw their outputs only. Nothing is imported unless torch.compile is in use
    (torch._dynamo loaded); a record the user keeps is counted, never replaced."""

    def __init__(self) -> None:
        self._debug: Any = None
        self._saved: tuple[Any, bool] | None = None
        self._start = 0
        if "torch._dynamo" not in sys.modules:
            return
        try:
            import torch._inductor.debug as debug
        except ImportError:
            return
        if not hasattr(debug, "RECORD_GRAPH_EXECUTION") or not hasattr(debug, "GRAPH_EXECUTION_ORDER"):
            return  # another torch: nothing counted
        self._debug = debug
        if debug.RECORD_GRAPH_EXECUTION and debug.GRAPH_EXECUTION_ORDER is not None:
            self._start = len(debug.GRAPH_EXECUTION_ORDER)
        else:
            self._saved = debug.GRAPH_EXECUTION_ORDER, debug.RECORD_GRAPH_EXECUTION
            debug.GRAPH_EXECUTION_ORDER, debug.RECORD_GRAPH_EXECUTION = [], True

    def stop(self) -> int:
        """How many compiled graphs ran; the recording is put back as it was."""
        debug, self._debug = self._debug, None
        if debug is None:
            return 0
        n = len(debug.GRAPH_EXECUTION_ORDER or ()) - self._start
        if self._saved is not None:
            debug.GRAPH_EXECUTION_ORDER, debug.RECORD_GRAPH_EXECUTION = self._saved
        return n
