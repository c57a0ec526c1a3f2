"""Float64 stand-ins for the fused GPU kernels a reference device cannot run.

A step captured on a GPU calls CUDA's flash, memory-efficient or cuDNN attention (forward and
backward) and cuDNN's batch norm; the cpu64 reference has none of them, so replay once left them
uncompared and a fault inside them surfaced nowhere. `fused_reference` computes what each of them
must return from its own arguments with the math definition in float64: the attention output for a
forward (logsumexp, seeds and the rest are layouts of one kernel, not compared), dq, dk and dv for a
backward; batch norm's output (its saved statistics are a layout too), and its input, weight and
bias gradients.
`attention_args` reads every fused attention op's argument layout, for this and for the terms bound
(terms.terms_of). Both are embedded (`inspect.getsource`) into repro.py where the checked op is one
of them: they import only torch.
"""

from typing import Any, NamedTuple

import torch

STANDS_IN = frozenset({"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_backward",
                       "_scaled_dot_product_efficient_attention_backward",
                       "_scaled_dot_product_cudnn_attention_backward", "cudnn_batch_norm",
                       "cudnn_batch_norm_backward"})
"""The ops (overload packets) `fused_reference` stands in for."""


class AttentionArgs(NamedTuple):
    """What defines a fused attention op's math, from its arguments."""

    q: Any
    k: Any
    v: Any
    grad: Any
    """The output's gradient (a backward's first argument); None for a forward."""
    out: Any
    """The forward's output a backward reads; None for a forward."""
    mask: Any
    """The attention mask or bias, cut to (query length, key length); None for none."""
    dropout: float
    causal: bool
    packed: bool
    """Variable-length batches packed into one sequence (cumulative sequence lengths given)."""


def attention_args(name: str, args: list[Any], kwargs: dict[str, Any]) -> AttentionArgs | None:
    """The math-defining arguments of fused attention op `name` (its overload packet) called with `args`
    and `kwargs`; None for another op."""

    def given(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.numel() > 0

    a = list(args)
    grad = out = None
    packed = False
    if name == "_scaled_dot_product_flash_attention":  # (q, k, v, dropout_p, is_causal, return_debug_mask)
        q, k, v = a[:3]
        dropout, causal, mask = (a + [0.0, False])[3], (a + [0.0, False])[4], None
    elif name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, ...)
        q, k, v, mask = a[:4]
        dropout, causal = (a + [0.0, 0.0, False])[5], (a + [0.0, 0.0, False])[6]
    elif name == "_scaled_dot_product_flash_attention_for_cpu_backward":
        # (grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale)
        grad, q, k, v, out, _, dropout, causal = a[:8]
        mask = kwargs.get("attn_mask")
    elif name == "_scaled_dot_product_flash_attention_backward":
        # (grad_out, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, ...)
        grad, q, k, v, out = a[:5]
        mask, dropout, causal, packed = None, a[10], a[11], given(a[6])
    elif name == "_scaled_dot_product_efficient_attention_backward":
        # (grad_out, q, k, v, attn_bias, out, logsumexp, philox_seed, philox_offset, dropout_p,
        #  grad_input_mask, is_causal, *, scale)
        grad, q, k, v, mask, out = a[:6]
        dropout, causal = a[9], (a[11] if len(a) > 11 else kwargs.get("is_causal", False))
    elif name == "_scaled_dot_product_cudnn_attention_backward":
        # (grad_out, q, k, v, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q, cum_seq_k,
        #  max_q, max_k, dropout_p, is_causal, *, scale)
        grad, q, k, v, out = a[:5]
        mask, dropout, causal, packed = a[8], a[13], a[14], given(a[9])
    else:
        return None
    mask = mask if given(mask) else None
    if mask is not None and mask.dim() == q.dim() and mask.shape[-2:] != (q.shape[-2], k.shape[-2]):
        mask = mask[..., :q.shape[-2], :k.shape[-2]]  # cuDNN / efficient pad the bias's last dims
    return AttentionArgs(q=q, k=k, v=v, grad=grad, out=out, mask=mask, dropout=float(dropout), causal=bool(causal),
                         packed=packed)


def fused_reference(name: str, args: list[Any], kwargs: dict[str, Any]) -> list[Any] | None:
    """What fused op `name` must return, from its arguments (moved to the reference device and dtype by
    the caller): [out] for a forward, [dq, dk, dv] for an attention backward, [dx, dw, db] for batch
    norm's; None where it cannot be rebuilt (dropout: the dropped weights are not in the arguments;
    packed variable-length batches; another op)."""
    import torch.nn.functional as F

    if name == "cudnn_batch_norm":  # (input, weight, bias, running_mean, running_var, training, momentum, eps)
        x, w, b, rm, rv, training, momentum, eps = args[:8]
        rm, rv = (t.clone() if isinstance(t, torch.Tensor) else None for t in (rm, rv))  # the kernel updates them
        return [torch.native_batch_norm(x, w, b, rm, rv, bool(training), float(momentum), float(eps))[0]]
    if name == "cudnn_batch_norm_backward":
        # (input, grad_out, weight, running_mean, running_var, save_mean, save_var: the inverse std, eps, reserve)
        x, g, w, rm, rv, mean, invstd, eps = args[:8]
        return list(torch.ops.aten.native_batch_norm_backward(g, x, w, rm, rv, mean, invstd, True, float(eps),
                                                              [True, True, True]))
    at = attention_args(name, args, kwargs)
    if at is None or at.dropout > 0 or at.packed:
        return None
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(at.grad is not None) for t in (at.q, at.k, at.v))
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=at.mask, is_causal=at.causal,
                                             scale=kwargs.get("scale"), enable_gqa=at.q.shape[-3] != at.k.shape[-3])
        if at.grad is None:
            return [out.detach()]
        return [g.detach() for g in torch.autograd.grad(out, (qq, kk, vv), at.grad.to(out.dtype))]
