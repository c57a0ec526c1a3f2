"""Flight recorder: always-on and cheap; the op-level capture afterwards, by re-executing a snapshot.

Full op capture (reproducers/capture.py) costs about 2x a step; nobody leaves it on. The flight
recorder instead keeps, per step, only the step's starting state: the model's parameters, buffers and
gradients, the optimizer's state, the batch, every RNG state (torch CPU and CUDA, Python, NumPy) and
the bit-changing settings, as copies on the device they live on. When a step goes wrong (a NaN loss,
a failed check, a watchdog), `recapture` puts that state back and runs the same step again under full
capture, on the same device, as many trials as it takes for the failure to show: the capture then
goes through replay and shrink like any other.

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
"""

from __future__ import annotations

import collections
import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree


def _clone(x: Any) -> Any:
    """Every tensor in a nested structure copied (same device); everything else as it is."""
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, x)


@dataclass(frozen=True, slots=True, kw_only=True)
class RngState:
    cpu: torch.Tensor
    cuda: list[torch.Tensor] = field(default_factory=list)
    python: Any = None
    numpy: Any = None

    @classmethod
    def now(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(cpu=torch.get_rng_state(), cuda=cuda, python=random.getstate(), numpy=np.random.get_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)


def settings() -> dict[str, Any]:
    """The bit-changing settings in force (recorded with every snapshot; restored with it)."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "threads": torch.get_num_threads()}


def _apply_settings(s: dict[str, Any]) -> None:
    torch.use_deterministic_algorithms(s["deterministic_algorithms"], warn_only=True)
    torch.set_float32_matmul_precision(s["float32_matmul_precision"])
    torch.backends.cuda.matmul.allow_tf32 = s["allow_tf32_matmul"]
    torch.backends.cudnn.allow_tf32 = s["allow_tf32_cudnn"]
    torch.backends.cudnn.deterministic = s["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = s["cudnn_benchmark"]
    torch.set_num_threads(s["threads"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One step's starting state."""

    step: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    buffers: list[torch.Tensor]
    optimizer: dict[str, Any] | None
    batch: Any
    rng: RngState
    settings: dict[str, Any]

    def nbytes(self) -> int:
        ts = [*self.params, *[g for g in self.grads if g is not None], *self.buffers,
              *[t for t in pytree.tree_leaves(self.optimizer) if isinstance(t, torch.Tensor)]]
        return sum(t.numel() * t.element_size() for t in ts)


class FlightRecorder:
    """Keeps the starting state of the last `keep` steps of `model` (and `optimizer`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, keep: int = 1):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.model, self.optimizer = model, optimizer
        self.snapshots: collections.deque[Snapshot] = collections.deque(maxlen=keep)
        self.steps = 0

    def snapshot(self, batch: Any = None) -> Snapshot:
        params = list(self.model.parameters())
        with torch.no_grad():
            snap = Snapshot(step=self.steps, params=[p.detach().clone() for p in params],
                            grads=[None if p.grad is None else p.grad.detach().clone() for p in params],
                            buffers=[b.detach().clone() for b in self.model.buffers()],
                            optimizer=_clone(self.optimizer.state_dict()) if self.optimizer is not None else None,
                            batch=_clone(batch), rng=RngState.now(), settings=settings())
        self.snapshots.append(snap)
        return snap

    @contextlib.contextmanager
    def step(self, batch: Any = None) -> Iterator[Snapshot]:
        """Around one training step: its starting state is kept before the step runs."""
        snap = self.snapshot(batch)
        try:
            yield snap
        finally:
            self.steps += 1

    @property
    def last(self) -> Snapshot:
        if not self.snapshots:
            raise LookupError("the flight recorder has no snapshot yet (wrap a step in `with rec.step(batch):`)")
        return self.snapshots[-1]

    def restore(self, snap: Snapshot | None = None) -> Any:
        """Put the model, optimizer, RNGs and settings back as they were when `snap` (default: the last)
        was taken; returns a fresh copy of its batch."""
        snap = snap or self.last
        params = list(self.model.parameters())
        buffers = list(self.model.buffers())
        if len(params) != len(snap.params) or len(buffers) != len(snap.buffers):
            raise ValueError(f"the snapshot holds {len(snap.params)} parameters and {len(snap.buffers)} buffers; "
                             f"this model has {len(params)} and {len(buffers)}")
        with torch.no_grad():
            for p, v, g in zip(params, snap.params, snap.grads, strict=True):
                p.copy_(v)
                p.grad = None if g is None else g.clone()
            for b, v in zip(buffers, snap.buffers, strict=True):
                b.copy_(v)
        if self.optimizer is not None and snap.optimizer is not None:
            self.optimizer.load_state_dict(_clone(snap.optimizer))
        _apply_settings(snap.settings)
        snap.rng.restore()
        return _clone(snap.batch)

    def recapture(self, step_fn: Callable[[Any], Any], root: str | Path, *, snap: Snapshot | None = None,
                  trials: int = 1, failed: Callable[[Any], bool] | None = None) -> Path | None:
        """Re-run the step from `snap` (default: the last) under full op capture, up to `trials` times,
        until `failed(step's return value)` says the failure showed (without `failed`: the first trial).
        Returns the capture directory of that trial (root/trial-N), or None when no trial failed."""
        from .capture import capture

        for i in range(max(1, trials)):
            batch = self.restore(snap)
            where = Path(root) / f"trial-{i}"
            with capture(where):
                out = step_fn(batch)
            if failed is None or failed(out):
                return where
        return None

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
        self.snapshots.append(snap)
        return snap
