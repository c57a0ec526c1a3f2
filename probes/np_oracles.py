"""numpy twins of `probes.oracles`: the reference backend's checks, for backends that are not torch.

The JAX path (probes/jax_matmul.py, probes/jax_collectives.py) copies outputs to the host and
judges them here, so a TPU's report carries exactly the diagnosis a GPU's does: the same
`results.Mismatch` fields, the same flipped-bit histogram, the same tiles, the same consensus
hash (SHA-256 of the output's bytes, identical for identical bits whatever computed them).
tests/test_jax_backend.py holds each twin against its torch original on the same data.

Arrays may be numpy or anything `np.asarray` takes (bfloat16 comes as ml_dtypes.bfloat16).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..results import Mismatch, Oracle
from .oracles import MAX_LISTED, _bits_str, _tile_of, _unravel

_INT_VIEW = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
# half an ulp relative, by dtype name (numpy has no bfloat16: ml_dtypes' is named "bfloat16")
_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def unit_roundoff(dtype: Any) -> float:
    """2**-p for a float dtype with p significand bits (the twin of oracles.unit_roundoff)."""
    return _UNIT_ROUNDOFF.get(np.dtype(dtype).name, 2.0**-4)


def int_view(a: Any) -> np.ndarray:
    """The bits of `a` as signed integers of the same width (as torch's `.view(int)` gives them)."""
    arr = np.ascontiguousarray(np.asarray(a))
    return arr.view(_INT_VIEW[arr.dtype.itemsize])


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(int_view(a), int_view(b)))


def array_hash(a: Any) -> str:
    """SHA-256 of the array's bytes, short form: equal to oracles.tensor_hash for the same bits."""
    return hashlib.sha256(int_view(a).tobytes()).hexdigest()[:32]


def compare_bits(expected: Any, actual: Any, *, tensor: str, oracle: Oracle = Oracle.EXACT,
                 tile: int = 128) -> Mismatch | None:
    """Bitwise comparison (NaN payloads and signed zeros count); None when every bit matches."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        raise ValueError(f"{tensor}: shape/dtype differ: {expected.shape} {expected.dtype} "
                         f"vs {actual.shape} {actual.dtype}")
    ei, ai = int_view(expected).reshape(-1), int_view(actual).reshape(-1)
    diff = ei != ai
    n_bad = int(diff.sum())
    if n_bad == 0:
        return None
    width = expected.dtype.itemsize * 8
    flat = np.nonzero(diff)[0]
    xor = (ei[flat] ^ ai[flat]).astype(np.int64)
    hist = {b: int(c) for b in range(width) if (c := int(((xor >> b) & 1).sum()))}
    shape = list(expected.shape)
    head = flat[:MAX_LISTED]
    tiles = sorted({tuple(_tile_of(list(_unravel(int(i), shape)), tile)) for i in flat[:4096]})
    ef = expected.reshape(-1).astype(np.float64)
    af = actual.reshape(-1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(ef[flat] - af[flat])
    finite = err[np.isfinite(err)]
    return Mismatch(
        oracle=oracle,
        tensor=tensor,
        bad_elements=n_bad,
        total_elements=int(expected.size),
        first_indices=[list(_unravel(int(i), shape)) for i in head],
        tiles=[list(t) for t in tiles[:MAX_LISTED]],
        expected=[float(x) for x in ef[head]],
        actual=[float(x) for x in af[head]],
        expected_bits=[_bits_str(int(v), width) for v in ei[head]],
        actual_bits=[_bits_str(int(v), width) for v in ai[head]],
        bit_histogram=hist,
        max_abs_error=float(finite.max()) if finite.size else math.inf,
        note=f"tile={tile}",
    )


def nonfinite(actual: Any, *, tensor: str) -> Mismatch | None:
    """NaN or Inf in an output whose inputs were finite and bounded."""
    a = np.asarray(actual)
    bad = ~np.isfinite(a.astype(np.float64))
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    flat = np.nonzero(bad.reshape(-1))[0][:MAX_LISTED]
    shape = list(a.shape)
    return Mismatch(oracle=Oracle.NONFINITE, tensor=tensor, bad_elements=n_bad, total_elements=int(a.size),
                    first_indices=[list(_unravel(int(i), shape)) for i in flat],
                    actual=[float(a.reshape(-1)[i]) for i in flat], max_abs_error=math.inf)


@dataclass(frozen=True, slots=True)
class FreivaldsPlan:
    """Right- and left-hand sides (computed on the device in float32, kept in float64) and tolerances."""

    x: np.ndarray
    y: np.ndarray
    abx: np.ndarray  # A (B x)
    yab: np.ndarray  # (y^T A) B
    row_tol: np.ndarray
    col_tol: np.ndarray
    a64: np.ndarray  # the kernel's inputs in float64 on the host (locating bad elements, fp64 reference)
    b64: np.ndarray


def tolerances(row_c2: np.ndarray, col_c2: np.ndarray, k: int, n: int, out_dtype: Any, sigmas: float,
               u_in: float) -> tuple[np.ndarray, np.ndarray]:
    """oracles.freivalds_plan's statistical tolerance: output rounding, fp32 accumulation over k,
    inputs the kernel rounds, and the float32 mat-vecs of the check itself."""
    rel = math.sqrt(unit_roundoff(out_dtype) ** 2 + (2 * k + 2 * n) * 2.0**-48 + 2 * u_in**2)
    return sigmas * rel * np.sqrt(row_c2) + 1e-30, sigmas * rel * np.sqrt(col_c2) + 1e-30


def freivalds(plan: FreivaldsPlan, c: Any, *, tensor: str, tile: int = 128) -> Mismatch | None:
    """The twin of oracles.freivalds: None when C passes; else the bad rows x bad columns."""
    c = np.asarray(c)
    cc = c.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        rres = np.abs((cc @ plan.x).astype(np.float64) - plan.abx)
        cres = np.abs((plan.y @ cc).astype(np.float64) - plan.yab)
    rows = np.nonzero(~(rres <= plan.row_tol))[0]
    cols = np.nonzero(~(cres <= plan.col_tol))[0]
    if rows.size == 0 and cols.size == 0:
        return None
    r_list, c_list = rows[:64].tolist(), cols[:64].tolist()
    indices: list[list[int]] = []
    expected: list[float] = []
    actual: list[float] = []
    max_err = 0.0
    if r_list and c_list:
        sub_ref = plan.a64[r_list] @ plan.b64[:, c_list]
        sub_act = c[np.ix_(r_list, c_list)].astype(np.float64)
        with np.errstate(invalid="ignore"):
            err = np.abs(sub_ref - sub_act)
        for ri, ci in np.argwhere(~(err <= plan.row_tol[r_list][:, None])).tolist():
            if len(indices) < MAX_LISTED:
                indices.append([r_list[ri], c_list[ci]])
                expected.append(float(sub_ref[ri, ci]))
                actual.append(float(sub_act[ri, ci]))
        finite = err[np.isfinite(err)]
        max_err = float(finite.max()) if finite.size else math.inf
    tiles = sorted({(r // tile, col // tile) for r in r_list for col in c_list})[:MAX_LISTED]
    return Mismatch(
        oracle=Oracle.FREIVALDS, tensor=tensor, bad_elements=max(len(r_list), len(c_list)),
        total_elements=int(c.size), first_indices=indices, tiles=[list(t) for t in tiles], expected=expected,
        actual=actual, max_abs_error=max_err,
        note=f"bad_rows={rows.size} bad_cols={cols.size} first_rows={r_list[:MAX_LISTED]} "
             f"first_cols={c_list[:MAX_LISTED]}",
    )


def sampled_reference(a64: np.ndarray, b64: np.ndarray, c: Any, out_dtype: Any, *, rows: list[int], tensor: str,
                      sigmas: float = 12.0, u_in: float = 0.0) -> Mismatch | None:
    """The twin of oracles.sampled_reference: `rows` of C recomputed in float64 on the host."""
    k = a64.shape[1]
    ar = a64[rows]
    ref = ar @ b64
    act = np.asarray(c)[rows].astype(np.float64)
    spread = np.sqrt((ar * ar) @ (b64 * b64))
    tol = sigmas * (unit_roundoff(out_dtype) * np.abs(ref) + math.sqrt(k * 2.0**-48 + 2 * u_in**2) * spread) + 1e-30
    with np.errstate(invalid="ignore"):
        err = np.abs(ref - act)
    bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    where = np.argwhere(bad)[:MAX_LISTED].tolist()
    finite = err[np.isfinite(err)]
    return Mismatch(
        oracle=Oracle.REFERENCE, tensor=tensor, bad_elements=n_bad, total_elements=int(bad.size),
        first_indices=[[rows[r], col] for r, col in where], expected=[float(ref[r, col]) for r, col in where],
        actual=[float(act[r, col]) for r, col in where],
        max_abs_error=float(finite.max()) if finite.size else math.inf, note=f"sampled_rows={len(rows)}",
    )
