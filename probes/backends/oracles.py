"""The correctness oracles, written once against `Backend`, and the diagnosis of what went wrong.

- `compare_bits`: bitwise comparison against an exactly known expected array, with the full
  diagnosis (indices, tiles, values, bit patterns, flipped-bit histogram).
- `nonfinite`: NaN/Inf in an output whose inputs were finite and bounded.
- `freivalds_plan` / `freivalds`: C x == A (B x) and y^T C == (y^T A) B, which needs no
  reference, costs O(n^2) and locates the wrong rows and columns.
- `sampled_reference`: a few rows recomputed in float64 under a dtype-aware tolerance.
- `same_bits`, `array_hash`: repeat-determinism, and the bits of an output for fleet consensus.

The heavy part of every oracle runs on the backend's device (a bit view and one equality test
per repeat, two mat-vecs for Freivalds); only small results come to the host: the residual
vectors, the few mismatching elements, the first 4096 bad positions. The diagnosis is then
built on the host the same way for every backend, so a TPU's report reads exactly like a GPU's.
Code that holds arrays rather than a Backend passes `backends.backend_of(x)` (a torch tensor's
own device, else numpy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ...results import Mismatch, Oracle
from .base import FP32_ACCUMULATION, Accumulation, Backend, unit_roundoff

MAX_LISTED = 8  # indices / values listed per mismatch: enough to see the pattern, small enough to store
MAX_TILED = 4096  # bad elements whose tiles are listed
MAX_LOCATED = 64  # bad rows / columns Freivalds recomputes in float64


def bits_str(v: int, width: int) -> str:
    """`v`'s low `width` bits as a 0/1 string, most significant first."""
    return format(v & ((1 << width) - 1), f"0{width}b")


def tile_of(index: list[int], tile: int) -> list[int]:
    """The tile (of side `tile`) holding a multi-dimensional index."""
    return [i // tile for i in index]


def unravel(flat_index: int, shape: list[int]) -> tuple[int, ...]:
    """A row-major flat index as a multi-dimensional index into `shape`."""
    out = []
    for s in reversed(shape):
        out.append(flat_index % s)
        flat_index //= s
    return tuple(reversed(out))


def same_bits(bk: Backend, a: Any, b: Any) -> bool:
    """Bitwise equality (signed zeros and NaN payloads count), one device pass."""
    return (tuple(a.shape) == tuple(b.shape) and bk.dtype_name(a) == bk.dtype_name(b)
            and bk.same_bits(a, b))


def array_hash(bk: Backend, x: Any) -> str:
    """XXH3-128 of the output's bytes: equal for equal bits whatever computed them. Not SHA-256:
    hashing a 128 MB output took 168 ms of the host against 14 ms, and the hash only has to tell
    bit patterns apart for consensus (no adversary)."""
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(bk.host_bits(x)).data)


def compare_bits(bk: Backend, expected: Any, actual: Any, *, tensor: str, oracle: Oracle = Oracle.EXACT,
                 tile: int = 128) -> Mismatch | None:
    """Bitwise comparison; None when every bit matches.

    NaN payloads and signed zeros count: an exact probe's expected value has one bit pattern.
    """
    e_dt, a_dt = bk.dtype_name(expected), bk.dtype_name(actual)
    if tuple(expected.shape) != tuple(actual.shape) or e_dt != a_dt:
        raise ValueError(f"{tensor}: shape/dtype differ: {tuple(expected.shape)} {_dt_str(bk, e_dt)} "
                         f"vs {tuple(actual.shape)} {_dt_str(bk, a_dt)}")
    if bk.same_bits(expected, actual):  # one pass: the common case costs little
        return None
    ei, ai = bk.bits(expected), bk.bits(actual)
    flat = bk.nonzero_flat(ei != ai)
    n_bad = int(flat.shape[0])
    if n_bad == 0:
        return None
    eb, ab = bk.take_flat(ei, flat), bk.take_flat(ai, flat)
    width = 8 * bk.host_bits(eb[:1]).itemsize
    xor = bk.cast(eb ^ ab, "int64")
    hist = {b: c for b in range(width) if (c := bk.count((xor >> b) & 1))}
    head = flat[:MAX_LISTED]
    shape = list(expected.shape)
    tiles = sorted({tuple(tile_of(list(unravel(int(i), shape)), tile)) for i in bk.to_host(flat[:MAX_TILED])})
    return Mismatch(
        oracle=oracle,
        tensor=tensor,
        bad_elements=n_bad,
        total_elements=math.prod(shape),
        first_indices=[list(unravel(int(i), shape)) for i in bk.to_host(head)],
        tiles=[list(t) for t in tiles[:MAX_LISTED]],
        expected=_floats(bk, bk.take_flat(expected, head)),
        actual=_floats(bk, bk.take_flat(actual, head)),
        expected_bits=[bits_str(int(v), width) for v in bk.to_host(eb[:MAX_LISTED])],
        actual_bits=[bits_str(int(v), width) for v in bk.to_host(ab[:MAX_LISTED])],
        bit_histogram=hist,
        max_abs_error=bk.max_abs_diff(bk.take_flat(expected, flat), bk.take_flat(actual, flat)),
        note=f"tile={tile}",
    )


def _dt_str(bk: Backend, name: str) -> str:
    return f"torch.{name}" if bk.name == "torch" else name  # the wording each path always used


def _floats(bk: Backend, x: Any) -> list[float]:
    return [float(v) for v in bk.host_f64(x)]


def nonfinite(bk: Backend, actual: Any, *, tensor: str) -> Mismatch | None:
    """NaN or Inf in an output whose inputs were finite and bounded."""
    bad = ~bk.isfinite(actual)
    n_bad = bk.count(bad)
    if n_bad == 0:
        return None
    head = bk.nonzero_flat(bad)[:MAX_LISTED]
    shape = list(actual.shape)
    return Mismatch(
        oracle=Oracle.NONFINITE,
        tensor=tensor,
        bad_elements=n_bad,
        total_elements=math.prod(shape),
        first_indices=[list(unravel(int(i), shape)) for i in bk.to_host(head)],
        actual=_floats(bk, bk.take_flat(actual, head)),
        max_abs_error=math.inf,
    )


# ---- Freivalds ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FreivaldsPlan:
    """Precomputed right- and left-hand sides, so each repeat's check costs two mat-vecs."""

    x: Any  # +-1, float32, on the device
    y: Any
    abx: np.ndarray  # A (B x), computed in float32 on the device, float64 on the host
    yab: np.ndarray  # (y^T A) B
    row_tol: np.ndarray  # float64, host
    col_tol: np.ndarray
    b64: Any  # B in float64 on the device, kept for the sampled reference


def freivalds_plan(bk: Backend, a: Any, b: Any, out_dtype: str, *, seed: int, sigmas: float = 12.0,
                   u_in: float = 0.0, acc: Accumulation = FP32_ACCUMULATION) -> FreivaldsPlan:
    """Prepare the check for C = A B (float32 `a`, `b`) with C rounded to `out_dtype`, accumulated as `acc`.

    The tolerance is statistical: rounding errors are independent with zero mean, so the residual
    of row i is bounded by about sqrt(u_out^2 + acc.rel_var(k)) * ||C_i|| (fp32 accumulation:
    rel_var = k u_acc^2); `sigmas` times that never trips on a clean chip, and a flipped
    high-order bit lands far outside. Low-order flips are the exact oracle's job.
    """
    m, k = a.shape
    n = b.shape[1]
    x = bk.cast(bk.signs((n,), seed, "freivalds/x"), "float32")
    y = bk.cast(bk.signs((m,), seed, "freivalds/y"), "float32")
    # Right-hand sides in float32 on the device (their error, like the check's own, is budgeted
    # below), compared in float64 on the host.
    abx = _host64(bk, bk.dot(a, bk.dot(b, x)))
    yab = _host64(bk, bk.dot(bk.dot(y, a), b))
    # Expected squared norms of C's rows / columns from the inputs alone (never from C: a
    # corrupted huge value must not widen its own tolerance).
    a2, b2 = a * a, b * b
    row_c2 = _host64(bk, bk.dot(a2, bk.sum(b2, 1)))
    col_c2 = _host64(bk, bk.dot(bk.sum(a2, 0), b2))
    # output rounding, the kernel's accumulation over k terms, inputs the kernel rounds (tf32), and
    # the float32 mat-vecs of the check itself (C x over n terms, A (B x) over n + k)
    rel = math.sqrt(unit_roundoff(out_dtype) ** 2 + acc.rel_var(k) + (k + 2 * n) * 2.0**-48 + 2 * u_in**2)
    row_tol = sigmas * rel * np.sqrt(row_c2) + 1e-30
    col_tol = sigmas * rel * np.sqrt(col_c2) + 1e-30
    return FreivaldsPlan(x=x, y=y, abx=abx, yab=yab, row_tol=row_tol, col_tol=col_tol, b64=bk.cast(b, "float64"))


def _host64(bk: Backend, x: Any) -> np.ndarray:
    return bk.to_host(x).astype(np.float64)


def freivalds(bk: Backend, plan: FreivaldsPlan, a: Any, b: Any, c: Any, *, tensor: str,
              tile: int = 128) -> Mismatch | None:
    """None when C passes; else the bad rows x bad columns, with float64 expected values there.

    Per call: C in float32, two mat-vecs on the device, two n-vectors to the host.
    """
    cc = bk.cast(c, "float32")
    with np.errstate(invalid="ignore", over="ignore"):
        rres = np.abs(_host64(bk, bk.dot(cc, plan.x)) - plan.abx)
        cres = np.abs(_host64(bk, bk.dot(plan.y, cc)) - plan.yab)
        rows = np.nonzero(~(rres <= plan.row_tol))[0]
        cols = np.nonzero(~(cres <= plan.col_tol))[0]
    if rows.size == 0 and cols.size == 0:
        return None
    r_list, c_list = rows[:MAX_LOCATED].tolist(), cols[:MAX_LOCATED].tolist()
    indices: list[list[int]] = []
    expected: list[float] = []
    actual: list[float] = []
    max_err = 0.0
    if r_list and c_list:
        # Recompute the candidate intersections exactly enough (float64) to name the elements.
        ri, ci = bk.index(r_list), bk.index(c_list)
        sub_ref = bk.to_host(bk.dot64(a[ri], b[:, ci]))
        sub_act = bk.host_f64(c[ri][:, ci])
        with np.errstate(invalid="ignore"):
            err = np.abs(sub_ref - sub_act)
            bad = ~(err <= plan.row_tol[r_list][:, None])
        for i, j in np.argwhere(bad).tolist():
            if len(indices) < MAX_LISTED:
                indices.append([r_list[i], c_list[j]])
                expected.append(float(sub_ref[i, j]))
                actual.append(float(sub_act[i, j]))
        finite = err[np.isfinite(err)]
        max_err = float(finite.max()) if finite.size else math.inf
    tiles = sorted({(r // tile, col // tile) for r in r_list for col in c_list})[:MAX_LISTED]
    return Mismatch(
        oracle=Oracle.FREIVALDS,
        tensor=tensor,
        bad_elements=max(len(r_list), len(c_list)),
        total_elements=math.prod(c.shape),
        first_indices=indices,
        tiles=[list(t) for t in tiles],
        expected=expected,
        actual=actual,
        max_abs_error=max_err,
        note=f"bad_rows={rows.size} bad_cols={cols.size} first_rows={r_list[:MAX_LISTED]} "
             f"first_cols={c_list[:MAX_LISTED]}",
    )


def sampled_reference(bk: Backend, a: Any, b64: Any, c: Any, out_dtype: str, *, rows: list[int], tensor: str,
                      sigmas: float = 12.0, u_in: float = 0.0,
                      acc: Accumulation = FP32_ACCUMULATION) -> Mismatch | None:
    """Recompute `rows` of C in float64 (on the device); flag elements outside the dtype-aware tolerance.

    Tolerance per element: sigmas * (u_out |ref| + sqrt(acc.rel_var(k) + 2 u_in^2) sqrt((A^2 B^2)_ij)),
    the error model of Freivalds per element (fp32 accumulation: rel_var = k u_acc^2; the fp8
    tensor-core accumulator and the bit position still caught: docs/tolerances.md); catches a
    systematic error (a chip that rounds badly). `b64` is B in float64 (FreivaldsPlan.b64).
    """
    k = a.shape[1]
    ri = bk.index(rows)
    a64 = bk.cast(a[ri], "float64")
    ref = bk.to_host(bk.dot64(a64, b64))
    act = bk.host_f64(c[ri])
    spread = np.sqrt(bk.to_host(bk.dot64(a64 * a64, b64 * b64)))
    rel_spread = math.sqrt(acc.rel_var(k) + 2 * u_in**2)
    with np.errstate(invalid="ignore", over="ignore"):
        tol = sigmas * (unit_roundoff(out_dtype) * np.abs(ref) + rel_spread * spread) + 1e-30
        err = np.abs(ref - act)
        bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    where = np.argwhere(bad)[:MAX_LISTED].tolist()
    finite = err[np.isfinite(err)]
    return Mismatch(
        oracle=Oracle.REFERENCE,
        tensor=tensor,
        bad_elements=n_bad,
        total_elements=int(bad.size),
        first_indices=[[rows[r], col] for r, col in where],
        expected=[float(ref[r, col]) for r, col in where],
        actual=[float(act[r, col]) for r, col in where],
        max_abs_error=float(finite.max()) if finite.size else math.inf,
        note=f"sampled_rows={len(rows)}",
    )
