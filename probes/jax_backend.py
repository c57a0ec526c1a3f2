"""The JAX/XLA backend: inputs, timing and fault injection for probes that run through JAX.

The torch path's probes are defined by their inputs and oracles; this module gives a JAX
device the same inputs bit for bit, and the same `--inject` faults, so matmul, attention and
collectives run their one definition on JAX devices (probes/jax_matmul.py, jax_attention.py and
jax_collectives.py are the entry points) and report identical diagnoses.

- 64-bit integers: the counter-based generator (chipcheck/generator.py) hashes in int64, which JAX
  only has with `jax_enable_x64`. `init()` turns it on once per process and reports it in the
  settings stored with every result (it changes JAX's default dtypes; the probes here always
  name their dtypes, so nothing else depends on it).
- Inputs: generator's numpy functions take any array module (`xp=jax.numpy`): the mixer uses
  only multiply / xor / shift / mask, which wrap identically in XLA's int64.
- Faults: the same spec grammar (probes/faults.parse). JAX has no dispatch hook like torch's
  TorchDispatchMode, so a value fault (bitflip, stuck, nan) is applied to the host copy of the
  kernel's output that the probe checks (faults.corrupt on a zero-copy torch view: the same
  element and bit as the torch path for the same seed and call), and `slow` busy-waits inside
  the timed region. `op` names the JAX op (`dot_general`, `psum`, `all_gather`, ...).
  `hang` never returns from the call and `crash` kills the process (SIGKILL) inside it: the
  supervisor in fleet/jax_runner.py owns the watchdog and records both, as the torch launcher does.

jax is imported lazily: this module is imported by the probe registry on torch-only installs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import generator as g
from .faults import Fault, Firing

# The JAX ops a fault lands in when it names no `op` (the compute and communication kernels).
DEFAULT_OPS = ("dot_general", "attention", "psum", "pmax", "all_gather", "psum_scatter", "all_to_all", "ppermute")
# Every op name an `op=` may give on this path: the defaults and broadcast (a fault lands in it only when named).
OPS = (*DEFAULT_OPS, "broadcast")
VALUE_FAULTS = ("bitflip", "stuck", "nan")


def init() -> dict[str, Any]:
    """Import JAX with 64-bit integers on; the settings to store with every result."""
    import jax

    jax.config.update("jax_enable_x64", True)
    return {"backend": "jax", "jax": jax.__version__, "jax_enable_x64": True,
            "jax_platform": jax.default_backend()}


# ---- inputs: generator.py's numpy twins with xp = jax.numpy ---------------------------------


def on_device(device: Any) -> Any:
    """A context that makes `device` JAX's default device (a no-op for None)."""
    import contextlib

    import jax

    return jax.default_device(device) if device is not None else contextlib.nullcontext()


def uniform(shape: tuple[int, ...], seed: int, stream: str, *, device: Any = None, dtype: Any = None,
            offset: int = 0) -> Any:
    """generator.uniform on a JAX device: float32 in [-1, 1), then cast by XLA (round to nearest even)."""
    import jax.numpy as jnp

    with on_device(device):
        x = g.uniform_np(shape, seed, stream, offset=offset, xp=jnp)
        return x if dtype is None else x.astype(dtype)


def small_ints(shape: tuple[int, ...], seed: int, stream: str, radius: int, *, device: Any = None,
               dtype: Any = None, offset: int = 0) -> Any:
    """generator.small_ints on a JAX device."""
    import jax.numpy as jnp

    with on_device(device):
        x = g.small_ints_np(shape, seed, stream, radius, offset=offset, xp=jnp)
        return x if dtype is None else x.astype(dtype)


def signs(shape: tuple[int, ...], seed: int, stream: str, *, device: Any = None, offset: int = 0) -> Any:
    """generator.signs on a JAX device (int64 +-1)."""
    import jax.numpy as jnp

    with on_device(device):
        n = int(np.prod(shape))
        idx = jnp.arange(offset, offset + n, dtype=jnp.int64).reshape(shape)
        h = g.hash_indices(g.key(seed, stream), idx, offset + n - 1)
        return 1 - 2 * ((h >> 7) & 1)


def to_host(x: Any) -> np.ndarray:
    """A writable host copy (the checks and the fault hook work on it)."""
    return np.array(x, copy=True)


# ---- timing and faults --------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run `fn` once to completion; (its result, seconds). JAX dispatch is asynchronous, so the
    clock stops only once every output buffer is ready.

    On accelerators the clock is wall time. On JAX's CPU platform it is this process's CPU time,
    as base.Timer does for torch's CPU devices: forced host devices share the host's cores with
    everything else on it, and wall time would charge a device for its neighbours' load.
    """
    import jax

    clock = time.process_time if jax.default_backend() == "cpu" else time.perf_counter
    t0 = clock()
    out = fn()
    jax.block_until_ready(out)
    return out, max(clock() - t0, 1e-9)


def stall(seconds: float) -> float:
    """Busy-wait (not sleep: a slow chip keeps its core, and sleep overshoots short kernels)."""
    if seconds <= 0:
        return 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass
    return time.perf_counter() - t0


@dataclass(slots=True)
class Injector:
    """The faults for one (rank, probe), applied around one JAX kernel call at a time.

    `call(op, fn)` runs and times the kernel (a `slow` fault busy-waits inside the timing, as a
    slow chip keeps its core); `corrupt(op, host)` then applies the value faults due for that call
    to the host copy the probe checks.
    """

    faults: list[Fault]
    firing: Firing = field(default_factory=Firing)
    _due: list[tuple[Fault, int]] = field(default_factory=list)

    @staticmethod
    def for_rank(faults: list[Fault], rank: int, probe: str) -> Injector:
        return Injector([f for f in faults if f.applies_to(rank, probe)])

    def begin(self, op: str, dtype: str) -> float:
        """Count one call of `op` whose output is in `dtype`; remember the value faults due for it; return
        the slowdown factor. A fault of another dtype neither counts the call nor slows it (as on the
        torch path: a chip slow in bf16 runs its fp32 at full speed)."""
        self._due = []
        factor = 1.0
        for i, f in enumerate(self.faults):
            if (f.op != op if f.op else op not in DEFAULT_OPS) or (f.dtype and f.dtype != dtype):
                continue
            n = self.firing.fire(f, i)
            if n is None:
                continue
            if f.kind == "slow":
                factor = max(factor, f.factor)
            elif f.kind in VALUE_FAULTS:
                self._due.append((f, n))
        return factor

    def call(self, op: str, dtype: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run the kernel under test once (its output in `dtype`); (output, seconds) with any slowdown
        included."""
        factor = self.begin(op, dtype)
        out, dt = timed(fn)
        return out, dt + stall(dt * (factor - 1.0))

    @property
    def due(self) -> bool:
        """Whether a value fault is due for the last call (only then must its output visit the host)."""
        return bool(self._due)

    def corrupt(self, host: np.ndarray, output: int = 0, side: str | None = None) -> np.ndarray:
        """Apply the value faults due for the last call to `host`, the kernel's output number
        `output` (a fault's `output=`, default 0), in place (and return it). A collective calls it
        twice: with side="send" on what this rank contributes, side="recv" on what it received
        (a fault's `side=`); a kernel once, without a side."""
        if not self._due or host.size == 0:
            return host
        import torch

        from . import faults

        dt_name = host.dtype.name
        for f, n in self._due:
            if (f.output or 0) != output or (f.dtype and f.dtype != dt_name) or (side and f.side != side):
                continue
            if f.kind == "nan" and host.dtype.kind != "f" and dt_name != "bfloat16":
                continue  # an integer output has no NaN
            t = torch_view(host, torch)
            faults.corrupt(f, t, n)
        return host


def torch_view(host: np.ndarray, torch: Any) -> Any:
    """A torch tensor sharing `host`'s memory, so faults.corrupt hits the very bits the checks read."""
    if host.dtype.name == "bfloat16":
        return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(host)
