"""chipcheck.model: config validation, deterministic init and steps, the fp64 reference, and data and
tensor parallelism on real gloo process groups (two spawned processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import leave_group

from chipcheck.model import (
    ConfigError,
    GPTConfig,
    TrainConfig,
    Trainer,
    data,
    make_parallel,
    reference_losses,
)
from chipcheck.model.gpt import gather_tp

MC = GPTConfig.tiny()


def _losses(tc: TrainConfig, steps: int, seed: int = 3) -> tuple[list[float], Trainer]:
    tr = Trainer(MC, tc, seed=seed)
    out = [float(tr.step(*data.batch(MC, seed, s, batch_size=tc.batch_size))) for s in range(steps)]
    return out, tr


def test_config_validates_with_fix_it_messages() -> None:
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="tp"):
        TrainConfig(tp=3)
    assert GPTConfig.preset("gpu").d_model == 2048


def test_init_is_counter_based_and_tp_slices_match_full() -> None:
    a, b = Trainer(MC, TrainConfig(), seed=7).model, Trainer(MC, TrainConfig(), seed=7).model
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not torch.equal(a.wte, Trainer(MC, TrainConfig(), seed=8).model.wte)
    # A TP rank's slice is the corresponding slice of the full tensor (no process group needed to build).
    from chipcheck.model.gpt import GPT

    half = GPT(MC, seed=7, tp_rank=1, tp_size=2)
    d = MC.d_model // 2
    q_full = a.blocks[0].qkv
    assert torch.equal(half.blocks[0].qkv[:d], q_full[d:2 * d])
    assert torch.equal(half.blocks[0].proj, a.blocks[0].proj[:, d:])
    assert torch.equal(half.blocks[1].fc1, a.blocks[1].fc1[MC.d_hidden // 2:])


def test_data_shards_are_slices_of_the_global_batch() -> None:
    x, y = data.global_batch(MC, 5, 2, batch_size=3, shards=2)
    x1, y1 = data.batch(MC, 5, 2, batch_size=3, shard=1, shards=2)
    assert torch.equal(x[3:], x1) and torch.equal(y[3:], y1)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_steps_are_bitwise_repeatable_and_near_fp64(precision: str, tol: float) -> None:
    tc = TrainConfig(precision=precision)
    first, tr1 = _losses(tc, 6)
    again, tr2 = _losses(tc, 6)
    assert first == again
    for p, q in zip(tr1.state_tensors(), tr2.state_tensors(), strict=True):
        assert torch.equal(p, q)
    ref = reference_losses(MC, tc, seed=3, steps=6, shards=1)
    assert all(abs(a - e) <= tol * abs(e) for a, e in zip(first, ref, strict=True)), (first, ref)


def test_training_learns_the_synthetic_stream() -> None:
    losses, _ = _losses(TrainConfig(lr=3e-3), 30)
    assert losses[-1] < losses[0] - 0.5


# ---- two real processes over gloo ----------------------------------------------------------



def _worker(rank: int, world: int, out: str, tp: int, steps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file rendezvous in the test's own directory: no port to race for with tests running beside it.
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    try:
        par = make_parallel(tp)
        tc = TrainConfig(batch_size=4, tp=tp)
        tr = Trainer(MC, tc, seed=11, device="cpu", par=par)
        losses, sums = [], []
        for s in range(steps):
            x, y = data.batch(MC, 11, s, batch_size=4, shard=par.dp_rank, shards=par.dp_size)
            loss = tr.step(x, y)
            if par.dp_size > 1:
                dist.all_reduce(loss, group=par.dp_group)
                loss /= par.dp_size
            losses.append(float(loss))
            sums.append([p.detach().clone() for p in tr.params])
        full = gather_tp(tr.model, par.tp_group)
        torch.save({"losses": losses, "params": sums, "full": full, "par": (par.dp_rank, par.tp_rank)},
                   f"{out}/rank{rank}.pt")
    finally:
        leave_group()


def _spawn(tmp_path: Path, tp: int, steps: int = 3) -> list[dict]:
    mp.spawn(_worker, args=(2, str(tmp_path), tp, steps), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_data_parallel_on_two_gloo_ranks_matches_one_process(tmp_path: Path) -> None:
    res = _spawn(tmp_path, tp=1)
    # Replicas hold bitwise identical parameters after every step.
    for step in range(3):
        for p, q in zip(res[0]["params"][step], res[1]["params"][step], strict=True):
            assert torch.equal(p, q)
    assert res[0]["losses"] == res[1]["losses"]
    # ... and the same training as one process on the global batch (the all-reduce's summation
    # order differs from one big batch's, so within fp32 rounding, not bitwise).
    one = Trainer(MC, TrainConfig(batch_size=8), seed=11)
    single = [float(one.step(*data.global_batch(MC, 11, s, batch_size=4, shards=2))) for s in range(3)]
    assert res[0]["losses"] == pytest.approx(single, rel=1e-5)
    for p, q in zip(one.params, res[0]["params"][-1], strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-5)


def test_tensor_parallel_pair_matches_the_unsplit_model(tmp_path: Path) -> None:
    res = _spawn(tmp_path, tp=2)
    assert res[0]["losses"] == res[1]["losses"]  # the pair computes one model: one loss
    one, _ = _losses(TrainConfig(batch_size=4), 3, seed=11)
    assert res[0]["losses"] == pytest.approx(one, rel=1e-5)
    ref = Trainer(MC, TrainConfig(batch_size=4), seed=11)
    for s in range(3):
        ref.step(*data.batch(MC, 11, s, batch_size=4))
    for name, p in ref.model.named_parameters():
        for r in range(2):
            assert torch.allclose(res[r]["full"][name], p.detach(), rtol=0, atol=2e-5), (name, r)
    # replicated parameters (embeddings, norms) are bitwise identical across the pair
    assert torch.equal(res[0]["full"]["wte"], res[1]["full"]["wte"])
