"""The training step: forward, loss, backward, gradient all-reduce in buckets, AdamW.

Data parallelism is done by hand, like DistributedDataParallel's reducer but without overlap:
after backward, gradients are packed in reverse parameter order into buckets of at most
`bucket_mb`, each bucket is all-reduced (sum) over the data-parallel group and divided by its
size. Doing it by hand keeps the bucket order fixed (so the bits are reproducible) and exposes
the phases (`forward_backward`, `pack_grads`, `reduce`, `unpack_grads`, `optimizer_step`), so a
checker can look at a rank's local gradients before they are mixed with everyone else's.

Ranks are laid out [dp][tp]: a tensor-parallel pair is two consecutive ranks, and data-parallel
replicas are the ranks with the same tp rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import GPTConfig, TrainConfig
from .gpt import GPT


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallel:
    """Where this process sits in the data x tensor parallel grid (defaults: alone)."""

    rank: int = 0
    world: int = 1
    dp_group: Any = None
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: Any = None
    tp_rank: int = 0
    tp_size: int = 1
    dp_ranks: tuple[int, ...] = (0,)
    """Global ranks of this rank's data-parallel group, in dp-rank order."""


def make_parallel(tp: int = 1) -> Parallel:
    """The grid over the initialised default process group. Collective: every rank must call it
    with the same `tp`, in the same order (new_group is a collective)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if tp == 1:
        return Parallel(rank=rank, world=world, dp_group=dist.group.WORLD, dp_rank=rank, dp_size=world,
                        dp_ranks=tuple(range(world)))
    if world % tp:
        raise ValueError(f"tensor parallelism over {tp} ranks needs a world size divisible by {tp}, got {world}")
    tp_group = dp_group = None
    for first in range(0, world, tp):  # every rank creates every group, in one order
        grp = dist.new_group(list(range(first, first + tp)))
        if first <= rank < first + tp:
            tp_group = grp
    dp_ranks: tuple[int, ...] = ()
    for t in range(tp):
        ranks = list(range(t, world, tp))
        grp = dist.new_group(ranks)
        if rank % tp == t:
            dp_group, dp_ranks = grp, tuple(ranks)
    return Parallel(rank=rank, world=world, dp_group=dp_group, dp_rank=rank // tp, dp_size=world // tp,
                    tp_group=tp_group, tp_rank=rank % tp, tp_size=tp, dp_ranks=dp_ranks)


def determinism(device_type: str) -> str:
    """How the step is kept deterministic on `device_type`: "strict" where `strict_determinism` turns
    torch's deterministic mode from warn-only to strict for forward and backward, else "as set"."""
    if (device_type == "cuda" and torch.are_deterministic_algorithms_enabled()
            and torch.is_deterministic_algorithms_warn_only_enabled()):
        return "strict"
    return "as set"


@contextlib.contextmanager
def strict_determinism(device_type: str) -> Iterator[None]:
    """Strict deterministic mode for the step's forward and backward on CUDA, where the harness set
    the warn-only one. Under warn-only, torch lets the fused SDPA kernels (cuDNN, flash, memory-
    efficient) add into dq/dk/dv with atomics: on a healthy H200 three repeats of a bf16 or fp32 step
    ended in three different states and model_step called the chip flaky. Strict, flash and
    memory-efficient take their deterministic backward and cuDNN is not chosen; the same three
    repeats agreed bit for bit at about the warn-only speed (0.49 s against 0.46 s for four steps;
    the math backend, also deterministic, took 0.92 s). docs/model.md, 2026-12-04."""
    if determinism(device_type) != "strict":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


class Trainer:
    """A model, its AdamW optimizer and the step; one per rank."""

    def __init__(self, model_cfg: GPTConfig, train_cfg: TrainConfig, *, seed: int, device: Any = "cpu",
                 par: Parallel | None = None):
        par = par or Parallel()
        if par.tp_size != train_cfg.tp:
            raise ValueError(f"TrainConfig.tp={train_cfg.tp} but the process grid has tp={par.tp_size}")
        self.model_cfg, self.cfg, self.par = model_cfg, train_cfg, par
        self.device = torch.device(device)
        dtype = torch.float64 if train_cfg.precision == "fp64" else torch.float32
        self.model = GPT(model_cfg, seed=seed, device=self.device, dtype=dtype, tp_rank=par.tp_rank,
                         tp_size=par.tp_size, tp_group=par.tp_group)
        self.params = list(self.model.parameters())
        # foreach on GPUs (fewer launches), the single-tensor loop on CPUs (what torch picks there anyway);
        # fixed explicitly because the two paths may round differently.
        self.opt = torch.optim.AdamW(self.params, lr=train_cfg.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                     weight_decay=train_cfg.weight_decay, foreach=self.device.type == "cuda")
        self.buckets = _plan_buckets(self.params, train_cfg.bucket_mb)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Local gradients of the mean cross-entropy of this shard into `.grad`; the loss, detached."""
        for p in self.params:
            p.grad = None
        with strict_determinism(self.device.type):
            with self.autocast():
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
        return loss.detach()

    def pack_grads(self) -> list[torch.Tensor]:
        """Local gradients as flat bucket tensors (fresh memory; `.grad` is untouched)."""
        return [torch.cat([self.params[i].grad.reshape(-1) for i in b]) for b in self.buckets]

    def reduce(self, flat: list[torch.Tensor]) -> None:
        """Average bucket tensors over the data-parallel group, in place, bucket by bucket."""
        if self.par.dp_size == 1:
            return
        import torch.distributed as dist

        for t in flat:
            dist.all_reduce(t, group=self.par.dp_group)
            t.div_(self.par.dp_size)

    def unpack_grads(self, flat: list[torch.Tensor]) -> None:
        """Copy bucket tensors back into `.grad`."""
        for b, t in zip(self.buckets, flat, strict=True):
            off = 0
            for i in b:
                p = self.params[i]
                n = p.numel()
                p.grad.copy_(t[off:off + n].view_as(p))
                off += n

    def optimizer_step(self) -> None:
        self.opt.step()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One full data-parallel training step; returns this shard's loss (detached)."""
        loss = self.forward_backward(inputs, targets)
        if self.par.dp_size > 1:
            flat = self.pack_grads()
            self.reduce(flat)
            self.unpack_grads(flat)
        self.optimizer_step()
        return loss

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor whose bits define the training state: parameters, then AdamW moments."""
        yield from self.params
        for p in self.params:
            st = self.opt.state.get(p, {})
            for k in sorted(st):
                if isinstance(st[k], torch.Tensor):
                    yield st[k]


def _plan_buckets(params: list[torch.nn.Parameter], bucket_mb: float) -> list[list[int]]:
    """Parameter indices per bucket, in reverse order (the order backward produces gradients)."""
    cap = bucket_mb * 2**20
    buckets: list[list[int]] = [[]]
    size = 0
    for i in reversed(range(len(params))):
        nbytes = params[i].numel() * params[i].element_size()
        if buckets[-1] and size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


def reference_losses(model_cfg: GPTConfig, train_cfg: TrainConfig, *, seed: int, steps: int, shards: int,
                     device: Any = "cpu") -> list[float]:
    """The loss trace of `steps` steps in float64 on one process, over the global batch of `shards`
    data-parallel ranks (the mean over the global batch equals the mean of the shard means)."""
    from dataclasses import replace

    from . import data

    ref = Trainer(model_cfg, replace(train_cfg, precision="fp64", tp=1), seed=seed, device=device)
    out = []
    for s in range(steps):
        x, y = data.global_batch(model_cfg, seed, s, batch_size=train_cfg.batch_size, shards=shards, device=device)
        out.append(float(ref.step(x, y)))
    return out
