"""Synthetic token batches from the counter-based generator: any step and shard regenerates alone.

Sequence `s` of the run (global index over steps and data-parallel shards) is a function of
(seed, s) only, so a rank's shard, a replay of another rank's shard, and the single-process fp64
reference of the whole global batch all see identical tokens.

The stream is learnable, so the loss falls and the trace carries information: each next token is
(5 x + 3) mod V of the previous one with probability 3/4, else a fresh random token.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import generator as g
from .config import GPTConfig


def sequences(cfg: GPTConfig, seed: int, first: int, count: int) -> torch.Tensor:
    """Token ids [count, seq_len + 1] (int64, on the CPU) of global sequences first..first+count-1."""
    width = cfg.seq_len + 1
    idx = torch.arange(first * width, (first + count) * width, dtype=torch.int64).reshape(count, width)
    fresh = g.hash_indices(g.key(seed, "gpt/data/token"), idx) % cfg.vocab_size
    coin = (g.hash_indices(g.key(seed, "gpt/data/coin"), idx) & 3) == 0
    out = torch.empty_like(fresh)
    out[:, 0] = fresh[:, 0]
    for t in range(1, width):
        follow = (out[:, t - 1] * 5 + 3) % cfg.vocab_size
        out[:, t] = torch.where(coin[:, t], fresh[:, t], follow)
    return out


def batch(cfg: GPTConfig, seed: int, step: int, *, batch_size: int, shard: int = 0, shards: int = 1,
          device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [batch_size, seq_len] of data-parallel `shard` at `step`.

    The global batch of a step is `shards * batch_size` sequences; shard k takes the k-th block.
    """
    first = (step * shards + shard) * batch_size
    seq = sequences(cfg, seed, first, batch_size).to(device)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def global_batch(cfg: GPTConfig, seed: int, step: int, *, batch_size: int, shards: int,
                 device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All shards of a step concatenated in rank order (the single-process reference's batch)."""
    return batch(cfg, seed, step, batch_size=batch_size * shards, shard=0, shards=1, device=device)
