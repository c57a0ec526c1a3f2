"""The correctness oracles for torch tensors: probes/backends/oracles.py on the tensor's device.

The oracles are written once against the backend layer (probes/backends/oracles.py); this
module is their torch spelling for the probes that call them with tensors (attention, burn,
collectives, links, memory, bandwidth, model_step, xgemm, reproducers.replay). Each call runs
on the tensor's own device through `backends.torch.TorchBackend`; the diagnosis is the same
`results.Mismatch` every backend builds.

- `compare_bits`: bitwise comparison against an exactly known expected tensor, with the
  full diagnosis (indices, tiles, values, bit patterns, flipped-bit histogram).
- `freivalds`: the algebraic check C x == A (B x) (and y^T C == (y^T A) B), which needs no
  reference, costs O(n^2) and locates the wrong rows and columns.
- `sampled_reference`: a few rows recomputed in float64 under a dtype-aware tolerance.
- `tensor_hash`: the bits of an output, for fleet consensus.
"""

from __future__ import annotations

from typing import Any

from ..results import Mismatch, Oracle
from .backends import oracles as ora
from .backends.base import INT_BY_WIDTH
from .backends.base import unit_roundoff as _unit_roundoff_by_name
from .backends.oracles import MAX_LISTED, FreivaldsPlan, bits_str, tile_of, unravel
from .backends.torch import TorchBackend

__all__ = ["MAX_LISTED", "FreivaldsPlan", "bits_str", "int_view", "tile_of", "unravel", "compare_bits",
           "freivalds", "freivalds_plan", "nonfinite", "same_bits", "sampled_reference", "tensor_hash",
           "unit_roundoff"]


def _bk(t: Any) -> TorchBackend:
    return TorchBackend(t.device)


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def unit_roundoff(dtype: Any) -> float:
    """2**-p for a float dtype with p significand bits (the relative size of half an ulp)."""
    return _unit_roundoff_by_name(_name(dtype))


def int_view(t: Any) -> Any:
    """The tensor's bits as the signed integer dtype of the same width (for bitwise comparison)."""
    import torch

    return t.contiguous().view(getattr(torch, INT_BY_WIDTH[t.element_size()]))


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise equality (signed zeros and NaN payloads count), in one pass that stops early."""
    return ora.same_bits(_bk(a), a, b)


def compare_bits(expected: Any, actual: Any, *, tensor: str, oracle: Oracle = Oracle.EXACT,
                 tile: int = 128) -> Mismatch | None:
    """Bitwise comparison; None when every bit matches.

    NaN payloads and signed zeros count: an exact probe's expected value has one bit pattern.
    """
    return ora.compare_bits(_bk(actual), expected, actual, tensor=tensor, oracle=oracle, tile=tile)


def nonfinite(actual: Any, *, tensor: str) -> Mismatch | None:
    """NaN or Inf in an output whose inputs were finite and bounded."""
    return ora.nonfinite(_bk(actual), actual, tensor=tensor)


def freivalds_plan(a: Any, b: Any, out_dtype: Any, *, seed: int, sigmas: float = 12.0,
                   u_in: float = 0.0) -> FreivaldsPlan:
    """Prepare the check for C = A B with C rounded to `out_dtype` (a torch dtype) and fp32 accumulation."""
    bk = _bk(a)
    return ora.freivalds_plan(bk, bk.cast(a, "float32"), bk.cast(b, "float32"), _name(out_dtype), seed=seed,
                              sigmas=sigmas, u_in=u_in)


def freivalds(plan: FreivaldsPlan, a: Any, b: Any, c: Any, *, tensor: str, tile: int = 128) -> Mismatch | None:
    """None when C passes; else the bad rows x bad columns, with fp64 expected values there."""
    return ora.freivalds(_bk(c), plan, a, b, c, tensor=tensor, tile=tile)


def sampled_reference(a: Any, b: Any, c: Any, out_dtype: Any, *, rows: Any, tensor: str,
                      sigmas: float = 12.0, u_in: float = 0.0, b64: Any = None) -> Mismatch | None:
    """Recompute `rows` of C in float64; flag elements outside the dtype-aware tolerance."""
    row_list = rows.cpu().tolist() if hasattr(rows, "cpu") else list(rows)
    return ora.sampled_reference(_bk(c), a, b.double() if b64 is None else b64, c, _name(out_dtype),
                                 rows=row_list, tensor=tensor, sigmas=sigmas, u_in=u_in)


def tensor_hash(t: Any) -> str:
    """SHA-256 of the tensor's bytes (host copy), short form for consensus."""
    return ora.array_hash(_bk(t), t.detach())
