"""The backend layer: the few array primitives a probe needs, so a probe is written once.

A probe (probes/matmul.py), its oracles (backends/oracles.py) and the attention inputs
(attention.random_on / exact_on) are written against `Backend` (backends/base.py); three
implementations run them:

- `torch.TorchBackend`: a torch device through the harness's `ProbeContext` (its Timer and host
  lock, the TorchDispatchMode fault injector, the deadline);
- `jax.JaxBackend`: one JAX device and its `jax_backend.Injector` (`--backend jax`);
- `numpy.NumpyBackend`: the reference, on the host in numpy (golden values and tests).

`backend_of(x)` is the plain backend of an array a probe already holds (no timing, no faults),
so the oracles run on any tensor's own device: `oracles.compare_bits(backend_of(c), expected, c, ...)`.

Nothing heavy is imported here: the probe registry imports this package on every install.
"""

from __future__ import annotations

from typing import Any

from .base import Backend, Kernel, Unsupported

__all__ = ["Backend", "Kernel", "Unsupported", "backend_of"]


def backend_of(x: Any) -> Backend:
    """The backend of the device that holds `x`: a torch tensor's own device, else numpy on the host."""
    if type(x).__module__.startswith("torch"):
        from .torch import TorchBackend

        return TorchBackend(x.device)
    from .numpy import NumpyBackend

    return NumpyBackend()
