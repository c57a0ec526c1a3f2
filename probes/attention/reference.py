"""The fp64 reference of a random case: the formula and its gradients on sampled (batch, KV-head)
groups, the componentwise magnitude that scales their tolerance (`u_eff`), and the diagnosis of the
elements beyond it (`tolerance_mismatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ... import generator as g
from ...results import Mismatch, Oracle
from ..backends import oracles
from ..backends.base import INT_BY_WIDTH
from .inputs import Inputs, Shape, Variant


@dataclass(slots=True)
class Reference:
    """fp64 out/dq/dk/dv on sampled (batch, KV head) groups, their scales, and how to gather actuals."""

    groups: list[tuple[int, int]]
    ref: dict[str, Any]
    mag: dict[str, Any]
    """Componentwise magnitude of each output (the formula with every term made positive), the
    scale of its rounding error: causal rows and the cancellation in dS = P (dP - D) differ a lot."""
    u_eff: float
    tiny: float = 0.0
    """Spacing of the dtype's subnormals (fp16: 2^-24): the absolute floor of any rounding."""

    def tolerance(self, name: str, sigmas: float) -> Any:
        """Per-element tolerance of output `name`: sigmas * u_eff * (|ref| + magnitude) + subnormal spacing."""
        return sigmas * self.u_eff * (self.ref[name].abs() + self.mag[name]) + self.tiny

    def row_envelope(self, name: str) -> Any:
        """Largest magnitude per row index over the sampled groups, (1, 1, s, 1): the error scale of
        every (batch, head) at that row, for checks that cover groups the reference did not."""
        m = self.mag[name].amax(dim=(0, 1, 3))
        return m.view(1, 1, -1, 1)

    def gather(self, name: str, t: Any, g_size: int) -> Any:
        """The sampled slices of output `name`: (G, g, s, d) for out/dq, (G, 1, s, d) for dk/dv."""
        import torch

        if name in ("out", "dq"):
            return torch.stack([t[b, h * g_size:(h + 1) * g_size] for b, h in self.groups])
        return torch.stack([t[b, h:h + 1] for b, h in self.groups])

    def index(self, name: str, idx: list[int], g_size: int) -> list[int]:
        """(group, head-in-group, row, col) of the gathered tensor -> (batch, head, row, col)."""
        gi, hh, row, col = idx
        b, h = self.groups[gi]
        return [b, h * g_size + hh if name in ("out", "dq") else h, row, col]


def reference(inp: Inputs, var: Variant, shape: Shape, n_groups: int, seed: int) -> Reference:
    """softmax(Q K^T scale + mask) V and its gradients in float64, on `n_groups` groups (0: all)."""
    import torch

    all_groups = [(b, h) for b in range(shape.b) for h in range(shape.hkv)]
    if n_groups and n_groups < len(all_groups):
        step = len(all_groups) / n_groups
        off = g.key(seed, "attention/groups") % len(all_groups)
        groups = sorted({all_groups[(off + int(i * step)) % len(all_groups)] for i in range(n_groups)})
    else:
        groups = all_groups
    gs = shape.group
    sel = Reference(groups=groups, ref={}, mag={}, u_eff=0.0)
    q = sel.gather("out", inp.q, gs).double()  # (G, g, s, d)
    k = sel.gather("dk", inp.k, gs).double()  # (G, 1, s, d)
    v = sel.gather("dv", inp.v, gs).double()
    do = sel.gather("out", inp.dout, gs).double()
    scale = inp.scale if inp.scale is not None else 1.0 / math.sqrt(shape.d)
    s = (q @ k.transpose(-1, -2)) * scale
    if inp.mask is not None:
        s = s + inp.mask.double()
    if var.causal:
        s = s.masked_fill(~torch.ones(shape.s, shape.s, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    p = torch.softmax(s, dim=-1)
    del s
    out = p @ v
    dp = do @ v.transpose(-1, -2)
    dd = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - dd)
    # Kernels form D = rowsum(dO * O) from the output they rounded: its error scales with
    # sum |dO| |O|, not with |D| (which cancels: a query row with few keys had dq off by its sign).
    dd_mag = (do.abs() * (p @ v.abs())).sum(-1, keepdim=True)
    ds_mag = p * (dp.abs() + dd_mag)
    del dp
    sel.ref = {"out": out, "dq": (ds @ k) * scale,
               "dk": ((ds.transpose(-1, -2) @ q) * scale).sum(1, keepdim=True),
               "dv": (p.transpose(-1, -2) @ do).sum(1, keepdim=True)}
    sel.mag = {"out": p @ v.abs(), "dq": (ds_mag @ k.abs()) * scale,
               "dk": ((ds_mag.transpose(-1, -2) @ q.abs()) * scale).sum(1, keepdim=True),
               "dv": (p.transpose(-1, -2) @ do.abs()).sum(1, keepdim=True)}
    sel.u_eff = u_eff(inp.q.dtype, shape.s, shape.d)
    fi = torch.finfo(inp.q.dtype)
    sel.tiny = float(fi.tiny) * float(fi.eps)
    return sel


def u_eff(dtype: Any, s: int, d: int) -> float:
    """Relative error scale of SDPA outputs in `dtype`: sqrt(u^2 (1 + s/256) + (s + d) 2^-48).

    u: the dtype's unit roundoff (output rounding; half-precision kernels also round P and dS
    before their GEMMs). s/256: kernels that carry dk/dv (or the output) across key/query blocks
    in the output dtype add one rounding per block (measured on the CPU flash kernel: the error
    of dk/dv grows like sqrt(s)). (s + d) 2^-48: fp32 accumulation over s keys and d dims.
    """
    u = oracles.unit_roundoff(str(dtype).removeprefix("torch."))  # by name, as every backend spells it
    return math.sqrt(u * u * (1.0 + s / 256.0) + (s + d) * 2.0**-48)


def tolerance_mismatch(expected: Any, actual: Any, tol: Any, *, tensor: str, oracle: Oracle,
                       to_index: Any, note: str = "") -> Mismatch | None:
    """Elements with |actual - expected| > tol (NaN counts), diagnosed like `oracles.compare_bits`:
    indices (batch, head, row, col), expected (rounded to the output dtype) vs actual bits, and the
    histogram of flipped bit positions over the bad elements."""
    import torch

    err = (actual.double() - expected).abs()
    bad = ~(err <= tol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    flat = torch.nonzero(bad.reshape(-1)).reshape(-1)[:4096]
    width = actual.element_size() * 8
    ints = getattr(torch, INT_BY_WIDTH[actual.element_size()])
    e_bits = expected.to(actual.dtype).reshape(-1)[flat].contiguous().view(ints).to(torch.int64).cpu()
    a_bits = actual.reshape(-1)[flat].contiguous().view(ints).to(torch.int64).cpu()
    xor = e_bits ^ a_bits
    hist = {b: int(((xor >> b) & 1).sum()) for b in range(width)}
    shape = list(actual.shape)
    listed = flat[:oracles.MAX_LISTED].cpu().tolist()
    indices = [to_index(list(oracles.unravel(i, shape))) for i in listed]
    rows = sorted({tuple(to_index(list(oracles.unravel(int(i), shape)))[:3]) for i in flat})
    finite = err[torch.isfinite(err)]
    return Mismatch(
        oracle=oracle, tensor=tensor, bad_elements=n_bad, total_elements=actual.numel(),
        first_indices=indices,
        expected=[float(x) for x in expected.reshape(-1)[flat[:oracles.MAX_LISTED]].cpu()],
        actual=[float(x) for x in actual.reshape(-1)[flat[:oracles.MAX_LISTED]].double().cpu()],
        expected_bits=[oracles.bits_str(int(x), width) for x in e_bits[:oracles.MAX_LISTED]],
        actual_bits=[oracles.bits_str(int(x), width) for x in a_bits[:oracles.MAX_LISTED]],
        bit_histogram={b: c for b, c in hist.items() if c},
        max_abs_error=float(finite.max()) if finite.numel() else math.inf,
        note=(f"{note} bad_rows={len(rows)} rows(b,h,i)={[list(r) for r in rows[:oracles.MAX_LISTED]]} "
              f"tol_max={float(tol.max()) if hasattr(tol, 'max') else float(tol):.3g}").strip(),
    )

