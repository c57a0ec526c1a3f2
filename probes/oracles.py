"""Correctness oracles shared by the probes, and the diagnosis of what went wrong.

- `compare_bits`: bitwise comparison against an exactly known expected tensor, with the
  full diagnosis (indices, tiles, values, bit patterns, flipped-bit histogram).
- `freivalds`: the algebraic check C x == A (B x) (and y^T C == (y^T A) B), which needs no
  reference, costs O(n^2) and locates the wrong rows and columns.
- `sampled_reference`: a few rows recomputed in float64 under a dtype-aware tolerance.
- `tensor_hash`: the bits of an output, for fleet consensus.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from ..results import Mismatch, Oracle

MAX_LISTED = 8  # indices / values listed per mismatch: enough to see the pattern, small enough to store

_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def unit_roundoff(dtype: Any) -> float:
    """2**-p for a float dtype with p significand bits (the relative size of half an ulp)."""
    import torch

    return {
        torch.float64: 2.0**-53,
        torch.float32: 2.0**-24,
        torch.bfloat16: 2.0**-8,
        torch.float16: 2.0**-11,
    }.get(dtype, 2.0**-4)


def _int_view(t: Any) -> Any:
    import torch

    return t.contiguous().view(getattr(torch, _INT_VIEW[t.element_size()]))


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise equality (signed zeros and NaN payloads count), in one pass that stops early."""
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_int_view(a), _int_view(b))


def _bits_str(v: int, width: int) -> str:
    return format(v & ((1 << width) - 1), f"0{width}b")


def _tile_of(index: list[int], tile: int) -> list[int]:
    return [i // tile for i in index]


def compare_bits(expected: Any, actual: Any, *, tensor: str, oracle: Oracle = Oracle.EXACT,
                 tile: int = 128) -> Mismatch | None:
    """Bitwise comparison; None when every bit matches.

    NaN payloads and signed zeros count: an exact probe's expected value has one bit pattern.
    """
    import torch

    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        raise ValueError(f"{tensor}: shape/dtype differ: {tuple(expected.shape)} {expected.dtype} "
                         f"vs {tuple(actual.shape)} {actual.dtype}")
    ei, ai = _int_view(expected), _int_view(actual)
    if torch.equal(ei, ai):  # one pass, stops at the first difference: the common case costs little
        return None
    diff = ei != ai
    n_bad = int(diff.sum())
    if n_bad == 0:
        return None
    width = expected.element_size() * 8
    flat = torch.nonzero(diff.reshape(-1)).reshape(-1)
    xor = (ei.reshape(-1)[flat] ^ ai.reshape(-1)[flat]).to(torch.int64).cpu()
    hist: dict[int, int] = {}
    for b in range(width):
        c = int(((xor >> b) & 1).sum())
        if c:
            hist[b] = c
    first = flat[:MAX_LISTED].cpu().tolist()
    shape = list(expected.shape)
    indices = [list(_unravel(i, shape)) for i in first]
    tiles = sorted({tuple(_tile_of(ix, tile)) for ix in (list(_unravel(int(i), shape)) for i in flat[:4096].cpu())})
    ef = expected.reshape(-1)[flat[:MAX_LISTED]].double().cpu()
    af = actual.reshape(-1)[flat[:MAX_LISTED]].double().cpu()
    eb = ei.reshape(-1)[flat[:MAX_LISTED]].cpu().tolist()
    ab = ai.reshape(-1)[flat[:MAX_LISTED]].cpu().tolist()
    err = (expected.reshape(-1)[flat].double() - actual.reshape(-1)[flat].double()).abs()
    finite = err[torch.isfinite(err)]
    return Mismatch(
        oracle=oracle,
        tensor=tensor,
        bad_elements=n_bad,
        total_elements=expected.numel(),
        first_indices=indices,
        tiles=[list(t) for t in tiles[:MAX_LISTED]],
        expected=[float(x) for x in ef],
        actual=[float(x) for x in af],
        expected_bits=[_bits_str(v, width) for v in eb],
        actual_bits=[_bits_str(v, width) for v in ab],
        bit_histogram=hist,
        max_abs_error=float(finite.max()) if finite.numel() else math.inf,
        note=f"tile={tile}",
    )


def _unravel(flat_index: int, shape: list[int]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(flat_index % s)
        flat_index //= s
    return tuple(reversed(out))


def nonfinite(actual: Any, *, tensor: str) -> Mismatch | None:
    """NaN or Inf in an output whose inputs were finite and bounded."""
    import torch

    bad = ~torch.isfinite(actual)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    flat = torch.nonzero(bad.reshape(-1)).reshape(-1)[:MAX_LISTED].cpu().tolist()
    shape = list(actual.shape)
    return Mismatch(
        oracle=Oracle.NONFINITE,
        tensor=tensor,
        bad_elements=n_bad,
        total_elements=actual.numel(),
        first_indices=[list(_unravel(i, shape)) for i in flat],
        actual=[float(actual.reshape(-1)[i]) for i in flat],
        max_abs_error=math.inf,
    )


@dataclass(frozen=True, slots=True)
class FreivaldsPlan:
    """Precomputed right- and left-hand sides, so each repeat's check costs two mat-vecs."""

    x: Any
    y: Any
    abx: Any  # A (B x)
    yab: Any  # (y^T A) B
    row_tol: Any
    col_tol: Any
    check_dtype: Any  # the dtype C x is computed in (float32 suffices below a 16-bit output's rounding)
    a64: Any  # the inputs in float64, kept for the sampled reference
    b64: Any


def freivalds_plan(a: Any, b: Any, out_dtype: Any, *, seed: int, sigmas: float = 12.0,
                   u_in: float = 0.0) -> FreivaldsPlan:
    """Prepare the check for C = A B with C rounded to `out_dtype` and fp32 accumulation.

    The check runs in float64 on the device. The tolerance is statistical: rounding errors are
    independent with zero mean, so the residual of row i is bounded by about
    sqrt(u_out^2 + k u_acc^2) * ||C_i||; `sigmas` times that never trips on a clean chip, and a
    flipped high-order bit lands far outside. Low-order flips are the exact oracle's job.
    """
    from . import generator as g

    m, k = a.shape
    n = b.shape[1]
    af, bf = a.float(), b.float()
    x = g.signs((n,), seed, "freivalds/x", device=a.device).float()
    y = g.signs((m,), seed, "freivalds/y", device=a.device).float()
    # Right-hand sides in float32 (their error, like the check's own, is budgeted below), kept
    # as float64 for the comparison.
    abx = (af @ (bf @ x)).double()
    yab = ((y @ af) @ bf).double()
    # Expected squared norms of C's rows / columns from the inputs alone (never from C: a
    # corrupted huge value must not widen its own tolerance).
    a2, b2 = af * af, bf * bf
    row_c2 = (a2 @ b2.sum(dim=1)).double()
    col_c2 = (a2.sum(dim=0) @ b2).double()
    # output rounding, fp32 accumulation over k terms, inputs the kernel rounds (tf32), and the
    # float32 mat-vecs of the check itself (C x over n terms, A (B x) over n + k)
    rel = math.sqrt(unit_roundoff(out_dtype) ** 2 + (2 * k + 2 * n) * 2.0**-48 + 2 * u_in**2)
    row_tol = sigmas * rel * row_c2.sqrt() + 1e-30
    col_tol = sigmas * rel * col_c2.sqrt() + 1e-30
    import torch

    check = torch.float32
    a64, b64 = None, b.double()
    return FreivaldsPlan(x=x, y=y, abx=abx, yab=yab, row_tol=row_tol, col_tol=col_tol, check_dtype=check,
                         a64=a64, b64=b64)


def freivalds(plan: FreivaldsPlan, a: Any, b: Any, c: Any, *, tensor: str, tile: int = 128) -> Mismatch | None:
    """None when C passes; else the bad rows x bad columns, with fp64 expected values there."""
    import torch

    cc = c.to(plan.check_dtype)
    rres = ((cc @ plan.x).double() - plan.abx).abs()
    cres = ((plan.y @ cc).double() - plan.yab).abs()
    rows = torch.nonzero(~(rres <= plan.row_tol)).reshape(-1)
    cols = torch.nonzero(~(cres <= plan.col_tol)).reshape(-1)
    if rows.numel() == 0 and cols.numel() == 0:
        return None
    r_list = rows[:64].cpu().tolist()
    c_list = cols[:64].cpu().tolist()
    indices: list[list[int]] = []
    expected: list[float] = []
    actual: list[float] = []
    max_err = 0.0
    if r_list and c_list:
        # Recompute the candidate intersections exactly enough (fp64) to name the elements.
        sub_ref = a[r_list].double() @ b[:, c_list].double()
        sub_act = c[r_list][:, c_list].double()
        err = (sub_ref - sub_act).abs()
        tol = plan.row_tol[r_list].unsqueeze(1)
        for ri, ci in torch.nonzero(~(err <= tol)).cpu().tolist():
            if len(indices) < MAX_LISTED:
                indices.append([r_list[ri], c_list[ci]])
                expected.append(float(sub_ref[ri, ci]))
                actual.append(float(sub_act[ri, ci]))
        finite = err[torch.isfinite(err)]
        max_err = float(finite.max()) if finite.numel() else math.inf
    bad = max(len(r_list), len(c_list))
    tiles = sorted({(r // tile, c // tile) for r in r_list for c in c_list})[:MAX_LISTED]
    return Mismatch(
        oracle=Oracle.FREIVALDS,
        tensor=tensor,
        bad_elements=bad,
        total_elements=c.numel(),
        first_indices=indices,
        tiles=[list(t) for t in tiles],
        expected=expected,
        actual=actual,
        max_abs_error=max_err,
        note=f"bad_rows={rows.numel()} bad_cols={cols.numel()} first_rows={r_list[:MAX_LISTED]} "
             f"first_cols={c_list[:MAX_LISTED]}",
    )


def sampled_reference(a: Any, b: Any, c: Any, out_dtype: Any, *, rows: Any, tensor: str,
                      sigmas: float = 12.0, u_in: float = 0.0, b64: Any = None) -> Mismatch | None:
    """Recompute `rows` of C in float64; flag elements outside the dtype-aware tolerance.

    Tolerance per element: sigmas * (u_out |ref| + sqrt(k) u_acc sqrt((A^2 B^2)_ij)), the error
    model of Freivalds per element; catches a systematic error (a chip that rounds badly).
    """
    import torch

    k = a.shape[1]
    a64 = a[rows].double()
    b64 = b.double() if b64 is None else b64
    ref = a64 @ b64
    act = c[rows].double()
    spread = ((a64 * a64) @ (b64 * b64)).sqrt()
    rel_spread = math.sqrt(k * 2.0**-48 + 2 * u_in**2)
    tol = sigmas * (unit_roundoff(out_dtype) * ref.abs() + rel_spread * spread) + 1e-30
    err = (ref - act).abs()
    bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    where = torch.nonzero(bad)[:MAX_LISTED].cpu().tolist()
    row_list = rows.cpu().tolist() if hasattr(rows, "cpu") else list(rows)
    finite = err[torch.isfinite(err)]
    return Mismatch(
        oracle=Oracle.REFERENCE,
        tensor=tensor,
        bad_elements=n_bad,
        total_elements=int(bad.numel()),
        first_indices=[[row_list[r], col] for r, col in where],
        expected=[float(ref[r, col]) for r, col in where],
        actual=[float(act[r, col]) for r, col in where],
        max_abs_error=float(finite.max()) if finite.numel() else math.inf,
        note=f"sampled_rows={len(row_list)}",
    )


def tensor_hash(t: Any) -> str:
    """SHA-256 of the tensor's bytes (host copy), short form for consensus."""
    data = _int_view(t.detach()).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]
