"""How far a non-exact op's output may stray from its float64 reference: one rule for replay, shrink and
the emitted repro.py.

repro.py imports nothing from chipcheck, so it carries these functions' own source (emit.py embeds them
with `inspect.getsource`): a vendor's run of the reproducer judges an output exactly as the shrink that
wrote it did. They may use only torch and each other (and `cancelling_terms`, embedded beside them
where an op needs it).
"""

from __future__ import annotations

from typing import Any

import torch

from .terms import cancelling_terms


def outside_tolerance(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                      magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The elements of `actual` further than rtol x (|expected| + rms(expected)) from float64 `expected`,
    the scale widened to |magnitude| where that is larger (a sum's or a cancelling op's terms); equal
    values, NaN against NaN and `expected` correctly rounded to `actual`'s dtype (a cast's result, a
    value below that dtype's smallest step) always agree."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    finite = e[torch.isfinite(e)]
    scale = e.abs() + (finite.pow(2).mean().sqrt() if finite.numel() else 0.0)
    if magnitude is not None and magnitude.shape == e.shape:
        scale = torch.maximum(scale, magnitude.detach().cpu().double().abs())
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if actual.is_floating_point() and actual.dtype != torch.float64:
        same |= a == e.to(actual.dtype).double()
    return ~(((a - e).abs() <= rtol * scale) | same)


def absolute(x: Any) -> Any:
    """Arguments with every floating-point tensor and the `alpha`/`beta` scalars made non-negative."""
    if isinstance(x, dict):
        return {k: abs(v) if k in ("alpha", "beta") and isinstance(v, (int, float)) else absolute(v)
                for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(absolute(v) for v in x)
    return x.abs() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def widened_scale(widening: str | None, name: str, func: Any, args: list[Any], kwargs: dict[str, Any],
                  output: int) -> torch.Tensor | None:
    """What an op's tolerance scales with beyond its output (None: nothing): for `sums` (a sum of
    products, which keeps the rounding of terms that cancel) the op on its inputs' absolute values; for
    `terms` (a norm's, softmax's or attention's backward) the size of its centred terms."""
    if widening == "sums":
        out = func(*absolute(args), **absolute(kwargs))
        outs = [y for x in (out if isinstance(out, (list, tuple)) else [out])
                for y in (x if isinstance(x, (list, tuple)) else [x])]
        return outs[output]
    if widening == "terms":
        return cancelling_terms(name, list(args), kwargs, output)  # repro.py embeds it where an op needs it
    return None
