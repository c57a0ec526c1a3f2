"""Fault injection: a TorchDispatchMode that makes the faulty rank's kernels misbehave as its `Fault`s say
(the grammar: probes/faults/__init__.py)."""

from __future__ import annotations

import time
from typing import Any

from ..backends.base import INT_BY_WIDTH
from .firing import Firing
from .spec import CALL_TIME_PROBES, DEFAULT_OPS, Fault


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


# A slow c10d op is stretched by the time it took up to the rank's next op (the caller has waited
# for it by then), at most this much of it: a worker idle between two probes is not stretched.
LAG_CAP_S = 1.0


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

    firing = Firing()
    now = {i for i, f in enumerate(active) if f.at == "call" or (f.at is None and call_time)}

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
            # slow c10d ops: (issued at, extra factor). Their work finishes after the op returns
            # (gloo and NCCL are asynchronous), so the delay is charged at the rank's next op
            self.lagging: list[tuple[float, float]] = []
            return super().__enter__()

        def _lag(self) -> None:
            # a slow NIC or cable keeps the rank waiting, not computing: a sleep, where a busy wait
            # would take the core from the virtual CPU devices that share it
            now = time.perf_counter()
            time.sleep(max(min(now - t0, LAG_CAP_S) * extra for t0, extra in self.lagging))
            self.lagging.clear()

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
            if self.lagging:
                self._lag()
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
            if self.lagging:
                self._lag()
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
                n = firing.fire(f, i)
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
                n = firing.fire(f, active.index(f))
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
                self.lagging.append((t0, slow - 1.0))
            return out

    return _Injector
