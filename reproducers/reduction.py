"""An all-reduce's exact result on the host, written once for replay and for the emitted repro.py.

repro.py must run with only torch and numpy, so emit.py embeds this function's own source
(`inspect.getsource`) into the file instead of importing it; replay.py calls it directly.
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
