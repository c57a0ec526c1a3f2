"""The correctness oracles for host arrays: probes/backends/oracles.py on the numpy backend.

For the JAX probes not yet written against a Backend (probes/jax_attention.py,
probes/jax_collectives.py), which judge a host copy: the same `results.Mismatch` fields, the
same flipped-bit histogram, the same tiles and the same consensus hash (SHA-256 of the output's
bytes, identical for identical bits whatever computed them) as the torch path, because both are
the one implementation in backends/oracles.py. tests/test_jax_backend.py holds the two spellings
equal on the same data.

Arrays may be numpy or anything `np.asarray` takes (bfloat16 comes as ml_dtypes.bfloat16).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..results import Mismatch, Oracle
from .backends import oracles as ora
from .backends.base import unit_roundoff as _unit_roundoff_by_name
from .backends.numpy import NumpyBackend

_BK = NumpyBackend()


def unit_roundoff(dtype: Any) -> float:
    """2**-p for a float dtype with p significand bits (the twin of oracles.unit_roundoff)."""
    return _unit_roundoff_by_name(np.dtype(dtype).name)


def int_view(a: Any) -> np.ndarray:
    """The bits of `a` as signed integers of the same width (as torch's `.view(int)` gives them)."""
    return _BK.bits(a)


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise equality (signed zeros and NaN payloads count)."""
    return ora.same_bits(_BK, np.asarray(a), np.asarray(b))


def array_hash(a: Any) -> str:
    """SHA-256 of the array's bytes, short form: equal to oracles.tensor_hash for the same bits."""
    return ora.array_hash(_BK, np.asarray(a))


def compare_bits(expected: Any, actual: Any, *, tensor: str, oracle: Oracle = Oracle.EXACT,
                 tile: int = 128) -> Mismatch | None:
    """Bitwise comparison (NaN payloads and signed zeros count); None when every bit matches."""
    return ora.compare_bits(_BK, np.asarray(expected), np.asarray(actual), tensor=tensor, oracle=oracle, tile=tile)


def nonfinite(actual: Any, *, tensor: str) -> Mismatch | None:
    """NaN or Inf in an output whose inputs were finite and bounded."""
    return ora.nonfinite(_BK, np.asarray(actual), tensor=tensor)
