"""The matmul probe through JAX/XLA: probes/matmul.py's one definition on a JAX device.

The cases, inputs, repeat loop, oracles and metrics are `matmul.run`'s, written against the
backend layer; this module is the JAX runner's entry point (fleet/jax_runner.py calls `cases`
and `run_case`) onto `backends.jax.JaxBackend`:

- `exact`: matmul.hadamard's Sylvester-Hadamard inputs built on the JAX device from the same
  counter-based signs and permutations, so A, B and the closed-form C are bit-identical to the
  torch path's; any differing output bit is an error, in any summation order.
- `random`: uniform full-mantissa A and B = A with its rows reversed; Freivalds, non-finite
  values, a sampled float64 reference, repeat-determinism and the SHA-256 consensus hash of the
  output bytes. Every check runs on the device; only residual vectors, the sampled rows and the
  few mismatching elements come to the host.

The kernel is `lax.dot_general` with `precision=HIGHEST` (without it a TPU rounds float32 inputs
to bfloat16 passes and the float32 case would test something else) and
`preferred_element_type` = the input dtype (C in the input dtype, as on the torch path).
"""

from __future__ import annotations

from typing import Any

from . import jax_backend as jb
from . import matmul
from .base import CaseOutcome
from .matmul import MatmulProbe

# backends.jax.DTYPES, repeated so that listing the cases does not import jax
DTYPES = ("float32", "bfloat16", "float16")


def cases(cfg: MatmulProbe.Config) -> list[str]:
    """The torch path's case names, for the dtypes JAX runs here (tf32/fp8 need device-specific kernels)."""
    return [f"{d}/{mode}" for d in cfg.sizes if d in DTYPES for mode in matmul.MODES]


def run_case(device: Any, cfg: MatmulProbe.Config, case: str, seed: int, inj: jb.Injector) -> CaseOutcome:
    """One matmul case on one JAX device; `seed` is the run's base seed (the case stream is mixed in here)."""
    from .backends.jax import JaxBackend

    return matmul.run(JaxBackend(device, inj), cfg, case, seed)

