"""reproducers/fused.py: the float64 stand-ins for CUDA's fused attention kernels, checked on the CPU
against torch's own CPU flash kernels in float64, argument layout by argument layout (each CUDA op's
arguments built as its schema orders them)."""

from __future__ import annotations

import pytest
import torch

from chipcheck.reproducers.fused import STANDS_IN, fused_reference

aten = torch.ops.aten
E = torch.empty(0)
BATCH_NORM = {"cudnn_batch_norm", "cudnn_batch_norm_backward"}


def _qkv(hkv: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 24, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, 24, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, 24, 16, generator=g, dtype=torch.float64)
    return q, k, v


def _cpu_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The CPU flash kernel (float64): out, and dq, dk, dv for a fixed dO (k, v already repeated)."""
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    go = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(go, q, k, v, out, lse, 0.0, causal,
                                                                          attn_mask=mask, scale=scale)
    return out, go, dq, dk, dv


@pytest.mark.parametrize("causal", [False, True])
def test_every_attention_layout_matches_the_cpu_kernel(causal: bool) -> None:
    q, k, v = _qkv(hkv=4)
    scale = 0.3
    out, go, dq, dk, dv = _cpu_kernel(q, k, v, causal, scale)
    kw = {"scale": scale}
    calls = {
        "_scaled_dot_product_flash_attention": [q, k, v, 0.0, causal, False],
        "_scaled_dot_product_efficient_attention": [q, k, v, None, True, 0.0, causal],
        "_scaled_dot_product_cudnn_attention": [q, k, v, None, True, 0.0, causal, False],
        "_scaled_dot_product_flash_attention_backward": [go, q, k, v, out, E, E, E, 24, 24, 0.0, causal, E, E],
        "_scaled_dot_product_efficient_attention_backward": [go, q, k, v, E, out, E, E, E, 0.0,
                                                             [True, True, True, False], causal],
        "_scaled_dot_product_cudnn_attention_backward": [go, q, k, v, out, E, E, E, E, E, E, 24, 24, 0.0, causal],
    }
    assert set(calls) | BATCH_NORM == STANDS_IN
    for name, args in calls.items():
        # each argument list has exactly the arity of the CUDA op's schema (before its keyword `scale`)
        positional = [a for a in getattr(aten, name).default._schema.arguments if not a.kwarg_only]
        assert len(args) == len(positional), name
        got = fused_reference(name, args, kw)
        want = [out] if not name.endswith("_backward") else [dq, dk, dv]
        assert got is not None and len(got) == len(want), name
        for g_, w in zip(got, want, strict=True):
            torch.testing.assert_close(g_, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_cudnn_batch_norm_stands_in_as_batch_norm_in_float64(training: bool) -> None:
    # what an H200 replay against cpu64 left "replayed but not compared" (2026-12-04): cuDNN's batch norm
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.rand(3, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    kept = (rm.clone(), rv.clone())
    out = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
    args = [x.detach(), w.detach(), b.detach(), rm, rv, training, 0.1, 1e-5]
    assert len(args) == len(aten.cudnn_batch_norm.default._schema.arguments)
    (got,) = fused_reference("cudnn_batch_norm", args, {})  # type: ignore[misc]
    torch.testing.assert_close(got, out.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(rm, kept[0]) and torch.equal(rv, kept[1])  # the caller's running statistics untouched
    if not training:
        return
    go = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    want = torch.autograd.grad(out, (x, w, b), go)
    mean = x.detach().mean((0, 2, 3))
    invstd = (x.detach().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    args = [x.detach(), go, w.detach(), rm, rv, mean, invstd, 1e-5, E]
    assert len(args) == len(aten.cudnn_batch_norm_backward.default._schema.arguments)
    got_grads = fused_reference("cudnn_batch_norm_backward", args, {})
    assert got_grads is not None
    for g_, w_ in zip(got_grads, want, strict=True):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-12)



def test_grouped_query_heads_and_a_bias_are_rebuilt() -> None:
    q, k, v = _qkv(hkv=2)
    mask = torch.randn(2, 4, 24, 24, dtype=torch.float64)
    rep_k, rep_v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    out, go, dq, dk, dv = _cpu_kernel(q, rep_k, rep_v, False, None, mask)
    (o,) = fused_reference("_scaled_dot_product_cudnn_attention", [q, k, v, mask, True, 0.0, False, False], {})
    torch.testing.assert_close(o, out, rtol=1e-10, atol=1e-12)
    gq, gk, gv = fused_reference("_scaled_dot_product_cudnn_attention_backward",
                                 [go, q, k, v, out, E, E, E, mask, E, E, 24, 24, 0.0, False], {})
    torch.testing.assert_close(gq, dq, rtol=1e-10, atol=1e-12)
    # a key/value head serves two query heads: its gradient is their sum
    torch.testing.assert_close(gk, dk.unflatten(1, (2, 2)).sum(2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gv, dv.unflatten(1, (2, 2)).sum(2), rtol=1e-10, atol=1e-12)


def test_what_cannot_be_rebuilt_is_left_alone() -> None:
    q, k, v = _qkv()
    assert fused_reference("_scaled_dot_product_flash_attention", [q, k, v, 0.1, False, False], {}) is None  # dropout
    packed = torch.tensor([0, 24], dtype=torch.int32)
    assert fused_reference("_scaled_dot_product_flash_attention_backward",
                           [q, q, k, v, q, E, packed, packed, 24, 24, 0.0, False, E, E], {}) is None
    assert fused_reference("mm", [q, k], {}) is None


def test_replay_compares_a_kernel_the_reference_lacks_with_its_stand_in() -> None:
    """The real CUDA op, called on the host, raises (no CPU kernel): `reference_call` answers with the
    float64 math definition and says so, instead of leaving the op uncompared."""
    from chipcheck.reproducers import replay as rp

    q, k, v = _qkv(hkv=4)
    func = aten._scaled_dot_product_efficient_attention.default
    with pytest.raises(NotImplementedError):
        func(q, k, v, None, True, 0.0, True)
    outs, _, _, how = rp.reference_call(func, lambda upcast: ([q, k, v, None, True, 0.0, True], {}), True)
    assert how is rp.RefHow.STAND_IN
    torch.testing.assert_close(outs[0], _cpu_kernel(q, k, v, True, None)[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError):  # dropout: no stand-in; the reference still cannot run it
        rp.reference_call(func, lambda upcast: ([q, k, v, None, True, 0.5, True], {}), True)


def test_repro_py_embeds_the_stand_in_for_a_fused_op() -> None:
    """repro.py computes the expected value on the host: for a CUDA attention kernel, with the embedded
    stand-in (it imports only torch), from the embedded inputs."""
    from chipcheck.reproducers import emit
    from chipcheck.reproducers import shrink as sk

    q, k, v = (t.float() for t in _qkv(hkv=4))
    case = sk.OpCase(op="aten._scaled_dot_product_flash_attention.default",
                     args=[{"in": 0}, {"in": 1}, {"in": 2}, 0.0, True, False], kwargs={},
                     inputs=tuple(sk.Input(kind="data", shape=tuple(t.shape), dtype="float32", data=t) for t in (q, k, v)))
    src = emit.render_op(case, device="cuda", metric_line="test")
    ns: dict[str, object] = {"__name__": "repro"}
    exec(compile(src, "repro.py", "exec"), ns)  # noqa: S102 - the emitted file, as a vendor would run it
    last = ns["CASE"]["ops"][-1]  # type: ignore[index]
    assert last["fused"] and last["widening"] != "sums"
    ins = [ns["load"](s, "cpu").double() for s in last["inputs"]]  # type: ignore[operator]
    (out,) = ns["fused_reference"](last["op"].split(".")[1], ns["fill"](last["args"], ins, "cpu", lambda d: d), {})  # type: ignore[operator]
    torch.testing.assert_close(out, _cpu_kernel(*(t.double() for t in (q, k, v)), True, None)[0], rtol=1e-10, atol=1e-12)
    assert "its math definition in float64 on the host" in src


def test_the_terms_bound_reads_every_backward_layout_and_repro_py_embeds_each_helper_once() -> None:
    """terms.terms_of and fused_reference read the attention arguments through one reader
    (fused.attention_args): every CUDA backward layout gets a terms bound that covers the gradient it
    bounds, and a repro.py for such an op (a cancelling op and a stand-in at once) carries each helper once."""
    from chipcheck.reproducers import emit
    from chipcheck.reproducers import shrink as sk
    from chipcheck.reproducers.terms import cancelling_terms

    q, k, v = _qkv(hkv=2)
    mask = torch.randn(2, 4, 24, 24, dtype=torch.float64)
    out, go, dq, dk, dv = _cpu_kernel(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), False, None, mask)
    layouts = {
        "_scaled_dot_product_efficient_attention_backward": [go, q, k, v, mask, out, E, E, E, 0.0,
                                                             [True, True, True, False], False],
        "_scaled_dot_product_cudnn_attention_backward": [go, q, k, v, out, E, E, E, mask, E, E, 24, 24, 0.0, False],
    }
    for name, args in layouts.items():
        grads = fused_reference(name, args, {})
        assert grads is not None, name
        for i, g_ in enumerate(grads):
            bound = cancelling_terms(name, args, {}, i)
            assert bound is not None and bool((g_.abs() <= bound * (1 + 1e-9)).all()), (name, i)
    name = "_scaled_dot_product_cudnn_attention_backward"
    tensors = [go, q, k, v, out, mask]
    slot = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 8: 5}  # argument position -> recorded input
    case = sk.OpCase(op=f"aten.{name}.default", kwargs={}, output=0,
                     args=[{"in": slot[i]} if i in slot else None if isinstance(a, torch.Tensor) else a
                           for i, a in enumerate(layouts[name])],
                     inputs=tuple(sk.Input(kind="data", shape=tuple(t.shape), dtype="float64", data=t) for t in tensors))
    src = emit.render_op(case, device="cuda", metric_line="test")
    assert all(src.count(f"def {f}(") == 1 for f in ("attention_args", "cancelling_terms", "fused_reference"))
    assert src.count("class AttentionArgs(") == 1
    ns: dict[str, object] = {"__name__": "repro"}
    exec(compile(src, "repro.py", "exec"), ns)  # noqa: S102 - the emitted file, as a vendor would run it
    last = ns["CASE"]["ops"][-1]  # type: ignore[index]
    assert last["fused"] and last["widening"] == "terms"
    ins = [ns["load"](s, "cpu") for s in last["inputs"]]  # type: ignore[operator]
    args = ns["fill"](last["args"], ins, "cpu", lambda d: d)  # type: ignore[operator]
    torch.testing.assert_close(ns["cancelling_terms"](name, args, {}, 0), cancelling_terms(name, layouts[name], {}, 0))  # type: ignore[operator]
    torch.testing.assert_close(ns["fused_reference"](name, args, {})[0], dq)  # type: ignore[operator,index]
