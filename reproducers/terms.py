"""How large the terms are that a norm's, softmax's or fused attention's backward subtracts from each other.

Their gradient is centred: `rstd * (w*g - mean(w*g) - xhat * mean(w*g*xhat))` for layer, group and
batch norm, `y * (g - sum(g*y))` for softmax, `g - exp(y) * sum(g)` for log-softmax, and inside fused
attention's backward `dS = P * (dO V^T - rowsum(dO * O))` before `dQ = scale dS K`, `dK = scale dS^T Q`.
When the loss is (nearly) blind to what the op removes (a sum straight after a norm, an RMS norm after
a layer norm, a softmax summed to one, attention over identical values), the terms cancel to rounding
noise, and a correct kernel's noise is far above a tolerance scaled by the tiny result. The bound a
float kernel meets is its terms' magnitude: the same formula with every term taken absolute (and
|x| + |mean| for the centred input, whose subtraction the kernel rounds too). Replay, shrink and
repro.py scale their tolerance with it (`cancelling_terms` is embedded in repro.py where the checked
op is one of these, with fused.attention_args: they import only torch).
"""

from typing import Any

import torch

from .fused import attention_args

CANCELLING = frozenset({"native_layer_norm_backward", "native_group_norm_backward", "native_batch_norm_backward",
                        "batch_norm_backward", "cudnn_batch_norm_backward", "_softmax_backward_data",
                        "_log_softmax_backward_data", "_scaled_dot_product_flash_attention_for_cpu_backward",
                        "_scaled_dot_product_flash_attention_backward",
                        "_scaled_dot_product_efficient_attention_backward",
                        "_scaled_dot_product_cudnn_attention_backward"})
"""The ops `cancelling_terms` bounds."""


def cancelling_terms(name: str, args: list[Any], kwargs: dict[str, Any], output: int) -> Any:
    """The magnitude of the terms that output `output` of aten op `name` (its overload packet), called
    with `args` and `kwargs` (float64 on the reference), sums; None where it is not bounded here (not
    one of these ops, an output they do not cover, dropout, packed variable-length batches, an argument
    layout the rebuild does not know), and the caller keeps its plain tolerance."""
    try:
        bound = terms_of(name, args, kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    return bound[output] if bound is not None and output < len(bound) else None


def terms_of(name: str, args: list[Any], kwargs: dict[str, Any]) -> list[Any] | None:
    """Per output of `name`, the magnitude of the terms it sums (`cancelling_terms`); may raise on an
    argument layout it does not know."""

    def norm(g: Any, x: Any, mean: Any, rstd: Any, w: Any, red: tuple[int, ...], keep: tuple[int, ...]) -> list[Any]:
        # g, x, mean, rstd, w broadcast against each other; `red`: the dims one statistic covers,
        # `keep`: the dims a weight's gradient sums over
        r = rstd.abs()
        xa = (x.abs() + mean.abs()) * r
        wg = (g * w).abs() if w is not None else g.abs()
        gi = r * (wg + wg.mean(red, keepdim=True) + xa * (wg * xa).mean(red, keepdim=True))
        return [gi, (g.abs() * xa).sum(keep), g.abs().sum(keep)]

    def attention(g: Any, q: Any, k: Any, v: Any, o: Any, mask: Any, causal: bool) -> list[Any]:
        # (batch, heads, length, dim); grouped-query attention: each key/value head serves `rep` heads
        s = kwargs.get("scale") or q.shape[-1] ** -0.5
        rep = q.shape[-3] // k.shape[-3]
        kk, vv = (k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)) if rep > 1 else (k, v)
        logits = q @ kk.transpose(-1, -2) * s
        if mask is not None:
            logits = logits.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else logits + mask
        if causal:  # top-left aligned, as scaled_dot_product_attention's is_causal
            logits = logits.masked_fill(~torch.ones(logits.shape[-2:], dtype=torch.bool).tril(), -torch.inf)
        p = torch.softmax(logits, -1).nan_to_num(0.0)  # a fully masked row attends to nothing
        ga = g.abs()
        ds = p * (ga @ vv.abs().transpose(-1, -2) + (ga * o.abs()).sum(-1, keepdim=True))
        gq, gk, gv = s * ds @ kk.abs(), s * ds.transpose(-1, -2) @ q.abs(), p.transpose(-1, -2) @ ga
        if rep > 1:
            gk, gv = (x.unflatten(-3, (k.shape[-3], rep)).sum(-3) for x in (gk, gv))
        return [gq, gk, gv]

    def t(x: Any) -> Any:
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    a = [t(x) for x in args]
    if name == "native_layer_norm_backward":  # (grad_out, input, normalized_shape, mean, rstd, weight, ...)
        g, x, shape, mean, rstd, w = a[:6]
        lead = x.dim() - len(shape)
        return norm(g, x, mean, rstd, w, tuple(range(lead, x.dim())), tuple(range(lead)))
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
    at = attention_args(name, a, kwargs)
    if at is None or at.grad is None or at.dropout > 0 or at.packed:  # dropped weights are not in the arguments
        return None
    return attention(at.grad, at.q, at.k, at.v, at.out, t(at.mask), at.causal)
