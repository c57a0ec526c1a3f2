"""Reproducers from a training stack nobody here wrote: a HuggingFace transformers GPT-2 (tiny config,
no download), one AdamW step on 2 real gloo ranks under DDP and under FSDP2 (`fully_shard`), with a
process-scope chip fault on rank 1 only. Capture must not change the step; replay vs cpu64 names the
corrupted GEMM; shrink writes a repro.py that exits 1 with the fault and 0 without."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import leave_group, run_cli

from chipcheck.reproducers import shrink as sk

pytest.importorskip("transformers")

FAULT = "bitflip:rank=1,bit=20,dtype=float32,every=2,scope=process"


def _model(mode: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, attn_pdrop=0.0,
                     embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model: torch.nn.Module = GPT2LMHeadModel(cfg)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def _state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def _rank(rank: int, world: int, root: str, mode: str, fault: str = FAULT) -> None:
    import torch.distributed as dist

    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    # capture never changes the step: the same step with and without it gives the same bits
    bare, bare_opt = _model(mode)
    _step(bare, bare_opt, ids)
    model, opt = _model(mode)
    with capture(f"{root}-clean"):
        _step(model, opt, ids)
    for a, b in zip(_state(bare), _state(model), strict=True):
        assert torch.equal(a, b), f"rank {rank}: capture changed the step's result"
    # the chip goes bad on rank 1: every 2nd fp32 GEMM of the process flips bit 20
    off = faults.start_process_faults(faults.parse(fault), rank)
    with capture(root):
        _step(model, opt, ids)
    off()
    leave_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_hf_gpt2_two_ranks_capture_replay_shrink(mode: str, tmp_path: Path) -> None:
    root = tmp_path / "cap"
    mp.start_processes(_rank, args=(2, str(root), mode), nprocs=2, start_method="spawn")
    # the healthy rank replays clean against float64; the bad one names a corrupted GEMM
    p = run_cli("repro", "replay", str(root), "--rank", "0", "--reference", "cpu64")
    assert p.returncode == 0 and "every op agrees with cpu64" in p.stdout, p.stdout + p.stderr
    # and bit for bit as captured: DDP's bucket indices (written through a raw pointer on its 2nd step)
    # and FSDP2's all-gather buffers (read while half of them is still uninitialised) are saved as read
    assert "differs from the captured bits" not in p.stdout, p.stdout
    p = run_cli("repro", "replay", str(root), "--rank", "1", "--reference", "cpu64", "--inject", FAULT)
    assert p.returncode == 1 and "first divergent op" in p.stdout and "20x1" in p.stdout, p.stdout + p.stderr
    assert any(g in p.stdout for g in ("aten.addmm.default", "aten.mm.default", "aten.bmm.default"))
    # no collective is blamed: not on the healthy step (DDP's bucket all-reduce, FSDP's all-gather and
    # reduce-scatter agree with their exact results), and not on the faulty one, whose bad GEMM fed
    # the gradients rank 1 sent (its replayed payload is not what it sent: unjudged, never a bad link)
    for cap in (f"{root}-clean", str(root)):
        with pytest.raises(sk.NotReproducible, match="matches the exact result") as e:
            sk.shrink_collective(cap)
        if cap.endswith("-clean"):
            # on the healthy step every payload is rebuilt as it was sent, so every collective is judged
            # (FSDP2's reduce-scatters were not, while a freed and re-used parameter storage was taken
            # for an alias of the freed one's tensor)
            assert "not judged" not in str(e.value), str(e.value)
    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(root), "--rank", "1", "--reference", "cpu64", "--inject", FAULT,
                "-o", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified:" in p.stdout and out.exists()
    bad = subprocess.run([sys.executable, str(out), "--inject", "bitflip:bit=20"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "REPRODUCED" in bad.stdout, bad.stdout + bad.stderr
    good = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr


def test_hf_gpt2_fsdp2_a_corrupted_reduce_scatter_is_a_link_fault_on_its_sender(tmp_path: Path) -> None:
    # a bad link, not a bad chip: one bit of the gradients rank 1 sends in FSDP2's first reduce-scatter
    # flips on the way. The chip computed them right, so replay rebuilds the payload as sent and the
    # received result differs from the exact sum: the reduce-scatter is named, with the element it hit.
    root = tmp_path / "cap"
    link = "bitflip:rank=1,bit=25,op=_reduce_scatter_base_,index=3,count=1,scope=process"
    mp.start_processes(_rank, args=(2, str(root), "fsdp2", link), nprocs=2, start_method="spawn")
    case = sk.shrink_collective(str(root))
    div = case.divergence
    assert div.collective == "reduce_scatter" and case.world == 2, div
    assert div.rank == 0 and div.metric.bad == 1, div  # element 3 of what rank 1 sent lands in rank 0's part
    assert "_reduce_scatter_base_" in div.op


def test_hf_bert_healthy_step_replays_clean_against_cpu64(tmp_path: Path) -> None:
    """A BERT MLM step's backward sums centred gradients (LayerNorm's): column sums that cancel to ~1e-13
    from terms of ~1e-3. Judged on the sum's value alone, a healthy chip's replay was called wrong."""
    from transformers import BertConfig, BertForMaskedLM

    from chipcheck.reproducers import capture
    from chipcheck.reproducers import format as fmt
    from chipcheck.reproducers import replay as rp

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=256, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with capture(tmp_path / "cap"):
        _step(model, opt, ids)
    res = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64")
    assert res.divergence is None, res.divergence.metric.line() if res.divergence else ""
    assert res.capture_mismatch is None
