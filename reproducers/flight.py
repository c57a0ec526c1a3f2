"""Flight recorder: always-on and cheap; the op-level capture afterwards, by re-executing a snapshot.

Full op capture with its values taken live (reproducers/capture.py) costs 2x to 10x a step; nobody
leaves it on. The flight recorder instead keeps, per step, only the step's starting state: the model's
parameters, buffers and gradients, the optimizer's state (and an AMP GradScaler's, `scaler=`), the
batch, every RNG state (torch CPU and CUDA, Python, NumPy) and the bit-changing settings, as copies on
the device they live on. When a step goes wrong (a NaN loss, a failed check, a watchdog), `recapture`
puts that state back and runs the same step again under full capture, on the same device, as many
trials as it takes for the failure to show: the capture then goes through replay and shrink like any
other.

    rec = FlightRecorder(model, optimizer)
    for batch in loader:
        with rec.step(batch):
            loss = train_step(batch)
        if not torch.isfinite(loss):
            rec.recapture(train_step, "out/cap", failed=lambda loss: not torch.isfinite(loss))

Re-execution is exact when the step is deterministic given that state (chipcheck's own workers set
the deterministic flags; the snapshot records them): the recaptured step computes the same bits as
the original did, which tests/test_flight.py checks on the tiny GPT. `save`/`load` keep a snapshot
on disk, to recapture in another process with a freshly built model and optimizer.

`FlightRecorder(model, optimizer, every=K)` copies the state only every K-th step (a checkpoint) and keeps
each step in between by its inputs alone (the batch and the optimizer's hyperparameters): a step's
starting state is then its checkpoint's state moved on by re-running the steps in between
(`materialize`), which `restore` and `recapture` do given the step function. The cost is a K-th of a
snapshot per step; the price is that the steps in between must re-run as they ran (deterministic, no
state moved outside them: an RNG draw, a setting or a parameter changed between steps would make the
re-execution another step; the op log's path check then says so).

`FlightRecorder(model, optimizer, oplog=True)` also keeps the live op log (oplog.py: every top-level
ATen op with its tensors' dtypes and shapes, from C++), and `recapture` checks its re-execution against
it: `path_check` says whether the recaptured step ran the ops the live one did.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import itertools
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import oplog as ol
from . import settings as st


def _clone(x: Any) -> Any:
    """Every tensor in a (tuple, list, dict) structure copied on its device; everything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i: one fused copy when they are plain tensors. A DTensor (FSDP2's and
    tensor parallelism's parameters) has no sharding rule for the fused copy, which raised into the
    user's step: its local shard is copied instead; any other subclass is copied one by one."""
    if all(type(t) in _PLAIN for t in src) and all(type(t) in _PLAIN for t in dst):
        torch._foreach_copy_(dst, src)
        return
    plain_d, plain_s = [], []
    for d, s in zip(dst, src, strict=True):
        d, s = _local(d), _local(s)
        if type(d) in _PLAIN and type(s) in _PLAIN:
            plain_d.append(d)
            plain_s.append(s)
        else:
            d.copy_(s)
    if plain_d:
        torch._foreach_copy_(plain_d, plain_s)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the memory this rank holds); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and hasattr(t, "device_mesh") else t


class _NumpyRng:
    """numpy's global RNG state, read in full only when it has moved. `np.random.get_state()` builds a
    624-word array and a tuple (about 100 us right after a step has pushed numpy out of the caches);
    the MT19937 bit generator's raw state (key[624], pos: 2.5 kB at its ctypes address) is compared
    with the last full read's instead, and that read is reused when they are equal. Only when that
    read held no cached Gaussian: a cached one is consumed by a draw that leaves the raw state as it is.
    The layout is checked against get_state() once; any other bit generator is always read in full."""

    _RAW = 624 * 4 + 4

    def __init__(self) -> None:
        self._addr: int | None = None
        self._raw: bytes | None = None
        self._state: Any = None
        try:
            bg = np.random.mtrand._rand._bit_generator
            addr = int(bg.ctypes.state_address)
            raw = ctypes.string_at(addr, self._RAW)
            state: Any = np.random.get_state()
            if state[0] == "MT19937" and raw == state[1].astype("<u4").tobytes() + int(state[2]).to_bytes(4, "little"):
                self._addr = addr
        except (AttributeError, TypeError, ValueError):
            self._addr = None

    def now(self) -> Any:
        if self._addr is None:
            return np.random.get_state()
        raw = ctypes.string_at(self._addr, self._RAW)
        if raw == self._raw:
            return self._state
        state: Any = np.random.get_state()
        self._raw, self._state = (raw, state) if state[3] == 0 else (None, None)
        return state


_NUMPY_RNG = _NumpyRng()


@dataclass(frozen=True, slots=True, kw_only=True)
class RngState:
    cpu: torch.Tensor
    cuda: list[torch.Tensor] = field(default_factory=list)
    python: Any = None
    numpy: Any = None

    @classmethod
    def now(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(cpu=torch.get_rng_state(), cuda=cuda, python=random.getstate(), numpy=_NUMPY_RNG.now())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)


_SCALER_STATE = ("_scale", "_growth_tracker")
"""The tensors a torch.amp.GradScaler keeps its state in (made on its first `scale`)."""


@dataclass(slots=True)
class StepInput:
    """What a step between checkpoints took besides the state it started from: its batch, and the
    optimizer's hyperparameters (a scheduler moves lr between steps); with `oplog=True`, the ops it
    ran live (set once the step is over), which its re-run is checked against."""

    batch: Any
    groups: tuple[dict[str, Any], ...]
    oplog: ol.OpLog | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One step's starting state. `tensors` holds, in order, the parameters, the gradients that exist
    (of the parameters `grad_of` lists), the buffers and the optimizer's tensor state (`opt_tensors`:
    (parameter index, key)); one flat list, so a new snapshot of the same model is one fused copy."""

    step: int
    tensors: list[torch.Tensor]
    n_params: int
    grad_of: tuple[int, ...]
    n_buffers: int
    opt_tensors: tuple[tuple[int, str], ...]
    opt_values: tuple[tuple[int, str, Any], ...]
    """The optimizer's state that is not a tensor (a Python step count), by value."""
    groups: tuple[dict[str, Any], ...]
    """The optimizer's hyperparameters per parameter group (lr, betas, ...), without the parameters."""
    batch: Any
    rng: RngState
    settings: dict[str, Any]
    oplog: ol.OpLog | None = field(default=None, repr=False, compare=False)
    """The ops the step ran live, when the recorder keeps the op log (oplog.py)."""
    sources: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """id() of the live tensors copied (a later snapshot into this slot skips the layout check when
    they are the same objects)."""
    scaler_tensors: tuple[str, ...] = ()
    """The GradScaler's tensors held after the optimizer's (`_scale`, `_growth_tracker`: the ones it has
    made yet; FlightRecorder(scaler=...))."""
    replay: tuple[StepInput, ...] = ()
    """The steps to re-run from the state held here before it is this step's starting state (a step
    between checkpoints, FlightRecorder(every=K)): the checkpoint's step first. Empty: the state held
    is this step's own."""

    @property
    def params(self) -> list[torch.Tensor]:
        return self.tensors[:self.n_params]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def layout(self) -> tuple[Any, ...]:
        return (self.n_params, self.grad_of, self.n_buffers, self.opt_tensors,
                tuple((t.shape, t.dtype, t.device) for t in self.tensors))


@dataclass(slots=True)
class _Between:
    """A step kept by its inputs alone (`every=K`): a few microseconds a step, where a Snapshot of its
    own would cost tens. `inputs` is its interval's list, shared by the interval's steps: the
    checkpoint's step first, this step's at `at` (its op log too, once it is over)."""

    step: int
    base: Snapshot
    inputs: list[StepInput]
    at: int

    def view(self) -> Snapshot:
        inp = self.inputs[self.at]
        return dataclasses.replace(self.base, step=self.step, batch=inp.batch, groups=inp.groups, oplog=inp.oplog,
                                   replay=tuple(self.inputs[:self.at]))


def _base(kept: Snapshot | _Between) -> Snapshot:
    return kept if isinstance(kept, Snapshot) else kept.base


def _view(kept: Snapshot | _Between) -> Snapshot:
    return kept if isinstance(kept, Snapshot) else kept.view()


class _StepScope:
    """`FlightRecorder.step`'s context (a class: a generator-based one costs more than a step kept by
    its inputs)."""

    __slots__ = ("rec", "batch", "entry", "log", "kept")

    def __init__(self, rec: FlightRecorder, batch: Any):
        self.rec, self.batch = rec, batch
        self.log: contextlib.AbstractContextManager[ol.Recording] | None = None
        self.kept: ol.Recording | None = None

    def __enter__(self) -> None:
        self.entry = self.rec._keep(self.batch)
        if self.rec.log_ops:
            self.log = ol.recording()
            self.kept = self.log.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.log is not None:
                self.log.__exit__(*exc)
        finally:
            self.rec._ended(self.entry, self.kept.result if self.kept is not None else None)


class FlightRecorder:
    """Keeps the starting state of the last `keep` steps of `model` (and `optimizer`).

    Cheap by construction: the parameters and buffers are listed once, and a new snapshot of the same
    layout is one fused copy into the memory of the snapshot it pushes out. So a snapshot is valid
    while it is among the last `keep`: `save` it (or `recapture` from it) before more steps run.
    With `every=K` only every K-th step is copied; the steps in between are kept by their inputs and
    re-run from their checkpoint when needed (module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, keep: int = 1,
                 oplog: bool = False, every: int = 1, scaler: Any = None):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        if every < 1:
            raise ValueError("every must be >= 1")
        self.every = every
        if oplog and (why := ol.available()) is not None:
            raise ol.OpLogUnavailable(why)
        self.model, self.optimizer = model, optimizer
        self.scaler = scaler
        """An AMP GradScaler (torch.amp.GradScaler) whose scale is part of the step's state: it halves
        after a step whose gradients overflowed, so a re-run of that step without it is another step."""
        self.log_ops = oplog
        self.path_check: ol.PathCheck | None = None
        """The last recapture's check of its re-execution against the live op log."""
        self.replay_checks: list[tuple[int, ol.PathCheck]] = []
        """(step, check) for each step that the last restore which re-ran steps (every=K) re-ran under
        the op log: its ops against the ones it ran live."""
        self._kept: collections.deque[Snapshot | _Between] = collections.deque(maxlen=keep)
        self._inputs: list[StepInput] = []
        """The current checkpoint interval's step inputs (every=K)."""
        self.steps = 0
        self.relist()

    @property
    def snapshots(self) -> list[Snapshot]:
        """The starting states kept, oldest first (`keep` of them)."""
        return [_view(k) for k in self._kept]

    def relist(self) -> None:
        """List the model's parameters and buffers again (done once, here: walking the module tree
        every step would cost more than the copy; call it after replacing parameters)."""
        self._params = list(self.model.parameters())
        self._buffers = list(self.model.buffers())
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._checkpoint_next = True  # the steps kept by their inputs re-run on the parameters
        # listed when their checkpoint was taken

    def snapshot(self, batch: Any = None) -> Snapshot:
        """Copy the state now (a checkpoint) as the starting state of the next step."""
        snap = self._take(batch, self._free_slot())
        self._checkpoint_next = False
        self._inputs = [StepInput(snap.batch, snap.groups)]
        self._kept.append(snap)
        return snap

    def _free_slot(self) -> Snapshot | None:
        """The snapshot whose memory the next one may copy into: the one about to be pushed out, unless
        a step kept after it by its inputs alone still starts from its state."""
        if len(self._kept) < (self._kept.maxlen or 0):
            return None
        old = _base(self._kept[0])
        return None if any(_base(k).tensors is old.tensors for k in itertools.islice(self._kept, 1, None)) else old

    def _take(self, batch: Any, old: Snapshot | None) -> Snapshot:
        params, buffers = self._params, self._buffers
        grad_of = tuple(i for i, p in enumerate(params) if p.grad is not None)
        live: list[torch.Tensor] = [*params, *(params[i].grad for i in grad_of), *buffers]  # type: ignore[misc, list-item]
        opt_tensors: list[tuple[int, str]] = []
        opt_values: list[tuple[int, str, Any]] = []
        groups: tuple[dict[str, Any], ...] = ()
        if self.optimizer is not None:
            index = self._index
            for p, state in self.optimizer.state.items():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        opt_tensors.append((index[id(p)], k))
                        live.append(v)
                    else:
                        opt_values.append((index[id(p)], k, v))
            groups = self._groups()
        scaler_tensors: tuple[str, ...] = ()
        if self.scaler is not None:
            scaler_tensors = tuple(n for n in _SCALER_STATE if isinstance(getattr(self.scaler, n, None), torch.Tensor))
            live.extend(getattr(self.scaler, n) for n in scaler_tensors)
        with torch.no_grad():
            # the same tensor objects the slot was copied from: the usual case, known without a
            # Python loop over every tensor's layout on every step
            ids = tuple(map(id, live))
            same = old is not None and old.n_params == len(params) and old.grad_of == grad_of \
                and old.n_buffers == len(buffers) and old.opt_tensors == tuple(opt_tensors) \
                and old.scaler_tensors == scaler_tensors \
                and (old.sources == ids or all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                                               for a, b in zip(old.tensors, live, strict=True)))
            if same and old is not None:  # the slot about to be dropped: one fused copy, no allocation
                _copy_all(old.tensors, live)
                tensors = old.tensors
            else:
                tensors = [t.detach().clone() for t in live]
        return Snapshot(step=self.steps, tensors=tensors, n_params=len(params), grad_of=grad_of,
                        n_buffers=len(buffers), opt_tensors=tuple(opt_tensors), opt_values=tuple(opt_values),
                        groups=groups, batch=_clone(batch), rng=RngState.now(), settings=st.current(), sources=ids,
                        scaler_tensors=scaler_tensors)

    def _groups(self) -> tuple[dict[str, Any], ...]:
        if self.optimizer is None:
            return ()
        return tuple({k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups)

    def step(self, batch: Any = None) -> _StepScope:
        """Around one training step (`with rec.step(batch):`): its starting state is kept before the
        step runs (`last`; with `oplog=True` the ops it runs too, once the step is over). With
        `every=K`, a step that is not a checkpoint keeps only its batch and the optimizer's
        hyperparameters."""
        return _StepScope(self, batch)

    def _keep(self, batch: Any) -> Snapshot | _Between:
        entry: Snapshot | _Between
        if self._kept and not self._checkpoint_next and self._kept[-1].step == self.steps - 1 \
                and len(self._inputs) < self.every:
            self._inputs.append(StepInput(_clone(batch), self._groups()))
            entry = _Between(self.steps, _base(self._kept[-1]), self._inputs, len(self._inputs) - 1)
            self._kept.append(entry)
            return entry
        return self.snapshot(batch)

    def _ended(self, entry: Snapshot | _Between, log: ol.OpLog | None) -> None:
        self.steps += 1
        if log is not None and self._kept and self._kept[-1] is entry:
            if isinstance(entry, _Between):
                entry.inputs[entry.at].oplog = log
            else:
                self._kept[-1] = dataclasses.replace(entry, oplog=log)
                if self._inputs and self._inputs[0].batch is entry.batch:
                    self._inputs[0].oplog = log

    @property
    def last(self) -> Snapshot:
        if not self._kept:
            raise LookupError("the flight recorder has no snapshot yet (wrap a step in `with rec.step(batch):`)")
        return _view(self._kept[-1])

    def restore(self, snap: Snapshot | None = None, step_fn: Callable[[Any], Any] | None = None) -> Any:
        """Put the model, optimizer, RNGs and settings back as they were when `snap` (default: the last)
        was taken; returns a fresh copy of its batch. A step kept by its inputs alone (`every=K`) is
        reached by re-running the steps since its checkpoint: `step_fn` is the step."""
        snap = snap or self.last
        if snap.replay and step_fn is None:
            raise ValueError(f"step {snap.step} was kept by its inputs alone (every={self.every}): its state is "
                             f"reached by re-running the {len(snap.replay)} step(s) since its checkpoint; "
                             "pass the step function (restore(snap, step_fn))")
        self._put(snap)
        if snap.replay:
            self.replay_checks = []
        for n, inp in enumerate(snap.replay, start=snap.step - len(snap.replay)):
            self._set_groups(inp.groups)
            batch = _clone(inp.batch)  # outside the log: the live step's batch was copied before it too
            if inp.oplog is None:
                step_fn(batch)  # type: ignore[misc]
                continue
            with ol.recording() as kept:
                step_fn(batch)  # type: ignore[misc]
            assert kept.result is not None
            self.replay_checks.append((n, ol.PathCheck.of(inp.oplog, kept.result)))
        self._set_groups(snap.groups)
        return _clone(snap.batch)

    def materialize(self, snap: Snapshot | None = None, step_fn: Callable[[Any], Any] | None = None) -> Snapshot:
        """`snap` with its own starting state copied (the steps since its checkpoint re-run once), so
        that trials restore it without re-running them; a checkpoint as it is. Not one of `snapshots`."""
        snap = snap or self.last
        if not snap.replay:
            return snap
        self.restore(snap, step_fn)
        own = self._take(None, None)
        return dataclasses.replace(own, step=snap.step, batch=snap.batch, groups=snap.groups, oplog=snap.oplog)

    def _set_groups(self, groups: tuple[dict[str, Any], ...]) -> None:
        if self.optimizer is not None:
            for g, saved in zip(self.optimizer.param_groups, groups, strict=False):
                g.update(saved)

    def _put(self, snap: Snapshot) -> None:
        """The state `snap` holds back into the model, optimizer, RNGs and settings. The live state has
        moved off the last step's: the next step is a checkpoint."""
        self._checkpoint_next = True
        params, buffers = self._params, self._buffers
        if len(params) != snap.n_params or len(buffers) != snap.n_buffers:
            raise ValueError(f"the snapshot holds {snap.n_params} parameters and {snap.n_buffers} buffers; "
                             f"this model has {len(params)} and {len(buffers)}")
        t = iter(snap.tensors)
        with torch.no_grad():
            for p in params:
                p.copy_(next(t))
                p.grad = None
            for i in snap.grad_of:
                params[i].grad = next(t).clone()
            for b in buffers:
                b.copy_(next(t))
            opt = [next(t) for _ in snap.opt_tensors]
            if self.optimizer is not None:
                self.optimizer.state.clear()
                for (i, k), v in zip(snap.opt_tensors, opt, strict=True):
                    self.optimizer.state[params[i]][k] = v.clone()
                for i, k, value in snap.opt_values:
                    self.optimizer.state[params[i]][k] = value
            if self.scaler is not None:  # a tensor it had not made yet: made again on its next `scale`
                held = dict(zip(snap.scaler_tensors, t, strict=True))
                for name in _SCALER_STATE:
                    setattr(self.scaler, name, held[name].clone() if name in held else None)
        st.apply(snap.settings)
        snap.rng.restore()

    def recapture(self, step_fn: Callable[[Any], Any], root: str | Path, *, snap: Snapshot | None = None,
                  trials: int = 1, failed: Callable[[Any], bool] | None = None, eager: bool = False) -> Path | None:
        """Re-run the step from `snap` (default: the last) under full op capture, up to `trials` times,
        until `failed(step's return value)` says the failure showed (without `failed`: the first trial).
        Returns the capture directory of that trial (root/trial-N), or None when no trial failed.

        When the snapshot holds the live op log, the step is first re-executed under the log alone (as
        it ran live: a dispatch mode changes some of what autograd runs) and the two logs compared;
        the verdict is `path_check`, written to root/path-check.txt, and a warning when the
        re-execution ran other ops than the live step (state the snapshot does not hold, a branch on
        something else): the capture then describes another step. Each step re-run to reach a step
        kept by its inputs (every=K) is checked the same way, a line each in path-check.txt, and a
        warning when one parts from its live ops (the state the step then starts from is not the live one).

        `eager=True` captures the trials with torch.compile set aside (`capture(..., eager=True)`): a
        compiled step's fused kernels are then recorded op by op and checked, where a compiled capture
        sees only their outputs. The path check still re-runs the step as it ran live (compiled)."""
        from .capture import capture

        replayed = bool((snap or self.last).replay)
        snap = self.materialize(snap, step_fn)
        checks = self.replay_checks if replayed else []
        lines = [f"step {n} (re-run from its checkpoint): {c.line()}" for n, c in checks]
        parted = [f"step {n} is {c.line()}" for n, c in checks if not c.same]
        self.path_check = None
        if snap.oplog is not None:
            self.path_check = self.check_path(step_fn, snap)
            lines.append(self.path_check.line())
            if not self.path_check.same:
                warnings.warn(f"flight recorder: the re-executed step is {self.path_check.line()}", stacklevel=2)
        if parted:
            warnings.warn(f"flight recorder: re-run to reach step {snap.step}, {parted[0]}: the state it starts "
                          "from is not the live one", stacklevel=2)
        if lines:
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / "path-check.txt").write_text("\n".join(lines) + "\n")
        for i in range(max(1, trials)):
            batch = self.restore(snap)
            where = Path(root) / f"trial-{i}"
            with capture(where, eager=eager):
                out = step_fn(batch)
            if failed is None or failed(out):
                return where
        return None

    def check_path(self, step_fn: Callable[[Any], Any], snap: Snapshot | None = None) -> ol.PathCheck:
        """Re-run the step from `snap` under the op log alone; compare with the ops it ran live."""
        snap = snap or self.last
        if snap.oplog is None:
            raise ValueError("this snapshot has no live op log (FlightRecorder(..., oplog=True) keeps one)")
        batch = self.restore(snap, step_fn)
        with ol.recording() as kept:
            step_fn(batch)
        assert kept.result is not None
        return ol.PathCheck.of(snap.oplog, kept.result)

    def save(self, path: str | Path, snap: Snapshot | None = None) -> Path:
        """Write a snapshot (default: the last) to `path` (torch.save), to recapture elsewhere."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(snap or self.last, p)
        return p

    def load(self, path: str | Path) -> Snapshot:
        """A snapshot written by `save` (it joins this recorder's), to `restore` or `recapture` from."""
        snap = torch.load(path, weights_only=False)
        if not isinstance(snap, Snapshot):
            raise ValueError(f"{path}: not a flight-recorder snapshot")
        self._kept.append(snap)
        self._checkpoint_next = True
        return snap
