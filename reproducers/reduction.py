"""A collective's exact result on the host, written once for replay and for the emitted repro.py.

repro.py must run with only torch and numpy, so emit.py embeds these functions' own source
(`inspect.getsource`) into the file instead of importing them; replay.py calls them directly.
"""

from __future__ import annotations

import torch


def reduction(op, xs, u):
    """(the exact float64 all-reduce `op` of every rank's input `xs` (float64 tensors), the error allowed
    per element): (world-1) roundings of unit `u` for a sum, an average or a product, none for min and max."""
    world = len(xs)
    if op in ("sum", "avg"):
        exp, tol = sum(xs), (world - 1) * u * sum(x.abs() for x in xs)
        return (exp / world, tol / world + u * (exp / world).abs()) if op == "avg" else (exp, tol)
    if op == "product":
        exp = xs[0].clone()
        for x in xs[1:]:
            exp = exp * x
        return exp, (world - 1) * u * exp.abs()
    stack = torch.stack(xs)
    exp = stack.amax(0) if op == "max" else stack.amin(0)
    return exp, torch.zeros_like(exp)


def exact_result(kind, op, xs, rank, src, u, splits=None):
    """(what group rank `rank` must hold after collective `kind` over every group rank's input `xs`
    (float64 tensors, in group-rank order), flattened; the error allowed per element). Moving data
    (all_gather, broadcast, all_to_all) allows none; reducing it allows what `reduction` allows.
    `splits`: an all-to-all's input split sizes per group rank (rows of dim 0 it sends to each rank;
    None or empty: equal chunks)."""
    flat = [x.reshape(-1) for x in xs]
    if kind == "all_to_all":  # rank `rank` receives, from every rank in order, the rows addressed to it
        parts = []
        for j, x in enumerate(xs):
            rows = x.shape[0] if x.dim() else 1
            sizes = splits[j] if splits and splits[j] else [rows // len(xs)] * len(xs)
            per = x.numel() // max(rows, 1)
            start = sum(sizes[:rank]) * per
            parts.append(flat[j][start:start + sizes[rank] * per])
        exp = torch.cat(parts)
        return exp, torch.zeros_like(exp)
    if kind == "all_reduce":
        return reduction(op, flat, u)
    if kind == "reduce_scatter":
        n = flat[0].numel() // len(flat)
        return reduction(op, [x[rank * n:(rank + 1) * n] for x in flat], u)
    exp = torch.cat(flat) if kind == "all_gather" else flat[src]
    return exp, torch.zeros_like(exp)
