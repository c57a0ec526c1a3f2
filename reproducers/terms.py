"""How large the terms are that a normalisation's or softmax's backward subtracts from each other.

Their gradient is centred: `rstd * (w*g - mean(w*g) - xhat * mean(w*g*xhat))` for layer, group and
batch norm, `y * (g - sum(g*y))` for softmax, `g - exp(y) * sum(g)` for log-softmax. When the loss is
(nearly) blind to what the op removes (a sum straight after a norm, an RMS norm after a layer norm,
a softmax summed to one), the terms cancel to rounding noise, and a correct kernel's noise is far
above a tolerance scaled by the tiny result. The bound a float kernel meets is its terms' magnitude:
the same formula with every term taken absolute (and |x| + |mean| for the centred input, whose
subtraction the kernel rounds too). Replay, shrink and repro.py scale their tolerance with it (this
function is embedded in repro.py: it imports only torch).
"""

from typing import Any

import torch

CANCELLING = frozenset({"native_layer_norm_backward", "native_group_norm_backward", "native_batch_norm_backward",
                        "batch_norm_backward", "cudnn_batch_norm_backward", "_softmax_backward_data",
                        "_log_softmax_backward_data"})
"""The ops `cancelling_terms` bounds."""


def cancelling_terms(name: str, args: list[Any]) -> list[Any] | None:
    """Per output of aten op `name` (its overload packet) called with positional `args` (float64 on
    the reference), the magnitude of the terms it sums, or None when the op is not one of these (a
    None entry: that output is not bounded here)."""

    def norm(g: Any, x: Any, mean: Any, rstd: Any, w: Any, red: tuple[int, ...], keep: tuple[int, ...]) -> list[Any]:
        # g, x, mean, rstd, w broadcast against each other; `red`: the dims one statistic covers,
        # `keep`: the dims a weight's gradient sums over
        r = rstd.abs()
        xa = (x.abs() + mean.abs()) * r
        wg = (g * w).abs() if w is not None else g.abs()
        gi = r * (wg + wg.mean(red, keepdim=True) + xa * (wg * xa).mean(red, keepdim=True))
        return [gi, (g.abs() * xa).sum(keep), g.abs().sum(keep)]

    def t(x: Any) -> Any:
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    a = [t(x) for x in args]
    if name == "native_layer_norm_backward":  # (grad_out, input, normalized_shape, mean, rstd, weight, ...)
        g, x, shape, mean, rstd, w = a[:6]
        k = len(shape)
        red = tuple(range(x.dim() - k, x.dim()))
        return norm(g, x, mean, rstd, w, red, tuple(range(x.dim() - k)))
    if name == "native_group_norm_backward":  # (grad_out, input, mean, rstd, weight, N, C, HxW, group, ...)
        g, x, mean, rstd, w, n, c, hw, groups = a[:9]
        n, c, hw, groups = int(n), int(c), int(hw), int(groups)
        view = (n, groups, c // groups, hw)
        out = norm(g.reshape(view), x.reshape(view), mean.reshape(n, groups, 1, 1), rstd.reshape(n, groups, 1, 1),
                   w.reshape(1, groups, c // groups, 1) if w is not None else None, (2, 3), (0, 3))
        return [out[0].reshape(x.shape), out[1].reshape(c), out[2].reshape(c)]
    if name in ("native_batch_norm_backward", "batch_norm_backward", "cudnn_batch_norm_backward"):
        if name == "cudnn_batch_norm_backward":  # (input, grad_out, weight, running_mean, running_var,
            x, g, w, rmean, rvar, smean, sinv = a[:7]  # save_mean, save_invstd, eps, reserve)
            eps = a[7]
        else:  # (grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps, ...)
            g, x, w, rmean, rvar, smean, sinv = a[:7]
            eps = a[8]
        c = x.shape[1]
        if isinstance(smean, torch.Tensor) and smean.numel() == c and isinstance(sinv, torch.Tensor):
            mean, inv = smean, sinv  # the batch's statistics (training)
        elif isinstance(rmean, torch.Tensor) and isinstance(rvar, torch.Tensor):
            mean, inv = rmean, (rvar + float(eps)).rsqrt()
        else:
            return None
        shape = (1, c) + (1,) * (x.dim() - 2)
        red = (0,) + tuple(range(2, x.dim()))
        # the training formula bounds the evaluation one (w * rstd * g) too
        return norm(g, x, mean.reshape(shape), inv.reshape(shape), w.reshape(shape) if w is not None else None,
                    red, red)
    if name == "_softmax_backward_data":  # (grad_output, output, dim, input_dtype)
        g, y, dim = a[:3]
        return [y.abs() * (g.abs() + (g * y).abs().sum(dim, keepdim=True))]
    if name == "_log_softmax_backward_data":
        g, y, dim = a[:3]
        return [g.abs() + y.exp() * g.abs().sum(dim, keepdim=True)]
    return None
