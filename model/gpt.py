"""A small GPT: token + position embedding, pre-norm causal self-attention (SDPA) and MLP blocks,
a final norm and a head tied to the token embedding. No biases, no dropout: every bit of a step is
a function of (config, seed, data).

Init is counter-based (`chipcheck.generator.uniform`): a parameter's values depend only on
(seed, its name, element index), never on a device's RNG, so CPU, CUDA and every tensor-parallel
split start from the same bits (a TP rank takes its slice of the full tensor).

Tensor parallelism (Megatron style, over 2 ranks): attention heads and the MLP hidden units are
split; q/k/v and fc1 are column-parallel (their input passes `_CopyToTP`: identity forward,
all-reduce of the gradient backward), proj and fc2 are row-parallel (their output passes
`_ReduceFromTP`: all-reduce forward, identity backward). Embeddings and norms are replicated.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import generator as g
from .config import GPTConfig


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the gradient is summed over the TP group (each rank saw part of the heads)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Sum of the partial outputs of a row-parallel layer forward; identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class Norm(nn.Module):
    def __init__(self, cfg: GPTConfig, dtype: torch.dtype, device: Any):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)


class Block(nn.Module):
    """Pre-norm block; holds this TP rank's heads and MLP hidden units."""

    def __init__(self, cfg: GPTConfig, tp_size: int, dtype: torch.dtype, device: Any):
        super().__init__()
        self.heads = cfg.n_heads // tp_size
        self.head_dim = cfg.head_dim
        d_local, h_local = self.heads * cfg.head_dim, cfg.d_hidden // tp_size
        empty = {"dtype": dtype, "device": device}
        self.norm1, self.norm2 = Norm(cfg, dtype, device), Norm(cfg, dtype, device)
        self.qkv = nn.Parameter(torch.empty(3 * d_local, cfg.d_model, **empty))
        self.proj = nn.Parameter(torch.empty(cfg.d_model, d_local, **empty))
        self.fc1 = nn.Parameter(torch.empty(h_local, cfg.d_model, **empty))
        self.fc2 = nn.Parameter(torch.empty(cfg.d_model, h_local, **empty))
        self.tp_group: Any = None

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp_group is None else _CopyToTP.apply(x, self.tp_group)

    def _leave(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp_group is None else _ReduceFromTP.apply(x, self.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = F.linear(self._enter(self.norm1(x)), self.qkv)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in h.chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        x = x + self._leave(F.linear(a, self.proj))
        m = F.gelu(F.linear(self._enter(self.norm2(x)), self.fc1), approximate="tanh")
        return x + self._leave(F.linear(m, self.fc2))


class GPT(nn.Module):
    """The reference model. `tp_rank`/`tp_size`/`tp_group` select this rank's shard of a TP pair."""

    def __init__(self, cfg: GPTConfig, *, seed: int, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None):
        super().__init__()
        if cfg.n_heads % tp_size or cfg.d_hidden % tp_size:
            raise ValueError(f"n_heads={cfg.n_heads} and d_hidden={cfg.d_hidden} must divide by tp={tp_size}")
        self.cfg, self.tp_rank, self.tp_size = cfg, tp_rank, tp_size
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model, dtype=dtype, device=device))
        self.wpe = nn.Parameter(torch.empty(cfg.seq_len, cfg.d_model, dtype=dtype, device=device))
        self.blocks = nn.ModuleList(Block(cfg, tp_size, dtype, device) for _ in range(cfg.n_layers))
        self.norm_f = Norm(cfg, dtype, device)
        for blk in self.blocks:
            blk.tp_group = tp_group if tp_size > 1 else None
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Counter-based init: the full (unsplit) tensor of every matrix, then this rank's slice."""
        cfg = self.cfg
        dev = self.wte.device
        std = cfg.init_std
        # Residual projections are scaled down with depth (GPT-2), so the stream's variance stays flat.
        std_out = std / math.sqrt(2 * cfg.n_layers)

        def full(name: str, shape: tuple[int, ...], s: float) -> torch.Tensor:
            # uniform on [-1, 1) has standard deviation 1/sqrt(3)
            return g.uniform(shape, seed, f"gpt/{name}", device=dev) * (s * math.sqrt(3.0))

        self.wte.copy_(full("wte", tuple(self.wte.shape), std))
        self.wpe.copy_(full("wpe", tuple(self.wpe.shape), std))
        d, dh, r, n = cfg.d_model, cfg.d_hidden, self.tp_rank, self.tp_size
        dl, hl = d // n, dh // n
        for i, blk in enumerate(self.blocks):
            qkv = full(f"h{i}/qkv", (3 * d, d), std)
            blk.qkv.copy_(torch.cat([qkv[j * d + r * dl: j * d + (r + 1) * dl] for j in range(3)]))
            blk.proj.copy_(full(f"h{i}/proj", (d, d), std_out)[:, r * dl:(r + 1) * dl])
            blk.fc1.copy_(full(f"h{i}/fc1", (dh, d), std)[r * hl:(r + 1) * hl])
            blk.fc2.copy_(full(f"h{i}/fc2", (d, dh), std_out)[:, r * hl:(r + 1) * hl])
            blk.norm1.weight.fill_(1.0)
            blk.norm2.weight.fill_(1.0)
        self.norm_f.weight.fill_(1.0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] for token ids [batch, seq]."""
        t = idx.shape[1]
        x = F.embedding(idx, self.wte) + self.wpe[:t]
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.norm_f(x), self.wte)

    def replicated(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters every TP rank holds whole (embeddings, norms): identical across the TP group."""
        return [(n, p) for n, p in self.named_parameters() if not _is_sharded(n)]

    def sharded(self) -> list[tuple[str, nn.Parameter]]:
        """This TP rank's slices of the split matrices (all matrices of a block when tp=1)."""
        return [(n, p) for n, p in self.named_parameters() if _is_sharded(n)]


def _is_sharded(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")


def gather_tp(model: GPT, group: Any) -> dict[str, torch.Tensor]:
    """The full (unsplit) state of a TP-split model, on every rank of `group` (for tests and checks)."""
    import torch.distributed as dist

    out: dict[str, torch.Tensor] = {}
    n = model.tp_size
    for name, p in model.named_parameters():
        if not _is_sharded(name) or n == 1:
            out[name] = p.detach().clone()
            continue
        parts = [torch.empty_like(p) for _ in range(n)]
        dist.all_gather(parts, p.detach().contiguous(), group=group)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "qkv":
            thirds = [q.chunk(3, dim=0) for q in parts]
            out[name] = torch.cat([thirds[r][j] for j in range(3) for r in range(n)])
        elif leaf in ("proj", "fc2"):
            out[name] = torch.cat(parts, dim=1)
        else:
            out[name] = torch.cat(parts, dim=0)
    return out
