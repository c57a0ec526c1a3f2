"""The attention probe through JAX/XLA: probes/attention's one definition, with JAX's kernels.

The cases (`<dtype>/d<head dim>/<variant>`), the config (probes/profiles/attention.toml: CPU
devices take the `[cpu.*]` rows, TPUs and GPUs the `[cuda.*]` rows), the inputs, the float64
reference and its tolerance, the case flow, the keep policy, the params and the metrics are the
torch probe's (`attention.plan`, `exact_on` / `random_on`, `run_kernels`); this module is the JAX
runner's entry point (fleet/jax_runner.py calls `cases` and `run_case`) and brings the kernels:

- `formula`: softmax(Q K^T scale + mask) V, K and V repeated over each KV head's query group,
  forward and backward through jax.vjp, float32 accumulation, einsums at precision=HIGHEST (a
  TPU's DEFAULT would run float32 in bfloat16 passes);
- `jax_nn`: jax.nn.dot_product_attention (scale, `bias=` the mask, `is_causal`) and its jax.vjp,
  where this JAX has it and can run it (else `params["skipped"]` says why).

The inputs are built on the JAX device (attention.random_on / exact_on, one compiled program each:
bit-identical to the torch path's). Each call's out, dq, dk, dv come to the host, where the value
faults of `jax_backend.Injector` land (`op=attention`; `output=` picks out, dq, dk or dv), and are
checked there, as CPU torch tensors, by the torch probe's own oracles.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .. import generator as g
from . import attention as ta
from . import jax_backend as jb
from .backends.torch import TorchBackend
from .base import CaseOutcome

OP = "attention"
DTYPES = ("float32", "bfloat16")  # no float16 here (jax.nn has no float16 attention on JAX's CPU platform)


def cases(cfg: ta.AttentionProbe.Config) -> list[str]:
    """The torch path's case names, for the dtypes JAX runs here."""
    return [c for c in ta.AttentionProbe().cases(cfg) if c.split("/")[0] in DTYPES]


def run_case(device: Any, cfg: ta.AttentionProbe.Config, case: str, seed: int, inj: jb.Injector) -> CaseOutcome:
    """One attention case on one JAX device; `seed` is the run's base seed (the case stream is mixed in here)."""
    from .backends.jax import JaxBackend

    dtype_name, shape, var = ta.plan(cfg, case)
    seed ^= g.stream_id(case)
    bk = JaxBackend(device)
    inp = (ta.exact_on if var.exact else ta.random_on)(bk, shape, var, dtype_name, seed)
    args = (inp.q, inp.k, inp.v, inp.dout, inp.mask)
    ran: list[ta.AttentionKernel] = []
    skipped: dict[str, str] = {}
    for name, program in _programs(var.causal, inp.scale or 1.0 / math.sqrt(shape.d)):
        try:
            jb.timed(functools.partial(program, *args))  # compile + warm-up, outside the faults
        except Exception as e:  # jax.nn where this platform cannot run it: said, not the chip's fault
            if name == "formula":
                raise
            skipped[name] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
            continue
        ran.append(ta.AttentionKernel(name, _call(program, args, inj)))
    if not _has_jax_nn():
        skipped["jax_nn"] = "absent: this JAX has no jax.nn.dot_product_attention"
    out = ta.run_kernels(TorchBackend("cpu"), cfg, case, shape, var, _on_host(inp), ran, skipped, seed)
    out.params.update(bk.params())
    return out


def _has_jax_nn() -> bool:
    import jax

    return hasattr(jax.nn, "dot_product_attention")


def _formula(q: Any, k: Any, v: Any, mask: Any, causal: bool, scale: float) -> Any:
    """softmax(q k^T scale + mask) v in float32 at HIGHEST precision, k and v repeated per query group."""
    import jax.numpy as jnp
    from jax import lax

    hi, group = lax.Precision.HIGHEST, q.shape[1] // k.shape[1]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=hi) * scale
    if mask is not None:
        s = s + mask.astype(jnp.float32)
    if causal:
        n = q.shape[2]
        s = jnp.where(jnp.tril(jnp.ones((n, n), dtype=bool)), s, -jnp.inf)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    return jnp.einsum("bhqk,bhkd->bhqd", p / p.sum(axis=-1, keepdims=True), v, precision=hi)


def _jax_nn(q: Any, k: Any, v: Any, mask: Any, causal: bool, scale: float) -> Any:
    """jax.nn.dot_product_attention: (batch, seq, heads, dim) layout, KV heads grouped by it, `bias` added to the logits."""
    import jax

    t = (0, 2, 1, 3)
    bias = None if mask is None else mask[None, None]
    return jax.nn.dot_product_attention(q.transpose(t), k.transpose(t), v.transpose(t), bias=bias, scale=scale,
                                        is_causal=causal).transpose(t)


def _fwd_bwd(attn: Callable[..., Any], q: Any, k: Any, v: Any, do: Any, mask: Any, *, causal: bool,
             scale: float) -> tuple[Any, ...]:
    """out (in the input dtype) and its dq, dk, dv for the cotangent `do`, as one program."""
    import jax

    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, mask, causal, scale).astype(q.dtype), q, k, v)
    return (out, *vjp(do))


def _programs(causal: bool, scale: float) -> list[tuple[str, Callable[..., Any]]]:
    """The kernels this JAX has, each `(q, k, v, dO, mask) -> (out, dq, dk, dv)` at HIGHEST matmul
    precision, jitted for this case (no two cases of a run share a shape and device)."""
    import jax

    def program(attn: Callable[..., Any]) -> Callable[..., Any]:
        jitted = jax.jit(functools.partial(_fwd_bwd, attn, causal=causal, scale=scale))

        def run(*args: Any) -> Any:
            with jax.default_matmul_precision("highest"):  # jax.nn's einsums too (TPU: no bf16 passes)
                return jitted(*args)

        return run

    return [("formula", program(_formula))] + ([("jax_nn", program(_jax_nn))] if _has_jax_nn() else [])


def _call(program: Callable[..., Any], args: tuple[Any, ...],
          inj: jb.Injector) -> Callable[[], tuple[dict[str, Any], float, None]]:
    """One timed call under the faults; its outputs as host copies (the value faults corrupt them there)."""

    def call() -> tuple[dict[str, Any], float, None]:
        import torch

        res, seconds = inj.call(OP, args[0].dtype.name, lambda: program(*args))
        hosts = [jb.to_host(x) for x in res]
        for i, h in enumerate(hosts):  # out, dq, dk, dv: a fault's `output=` picks one (default out)
            inj.corrupt(h, output=i)
        return {n: jb.torch_view(h, torch) for n, h in zip(ta.TENSORS, hosts, strict=True)}, seconds, None

    return call


def _on_host(inp: ta.Inputs) -> ta.Inputs:
    """The inputs (and exact mode's expected outputs) as CPU torch tensors, for the torch probe's checks."""
    import torch

    def host(x: Any) -> Any:
        return None if x is None else jb.torch_view(jb.to_host(x), torch)

    return replace(inp, q=host(inp.q), k=host(inp.k), v=host(inp.v), dout=host(inp.dout), mask=host(inp.mask),
                   expected={n: host(x) for n, x in inp.expected.items()})
