"""Tensor parallelism through DTensor (`parallelize_module` with ColwiseParallel / RowwiseParallel) on
2 gloo ranks: capture must not change the step (it crashed it: DTensor's sharding propagation runs each
op on fake tensors first, and the recorder read their non-existent bytes), a clean step yields no
reproducer with every collective judged, and a bit flipped in what rank 1 sends in the row-parallel
layer's all-reduce (a functional collective) becomes a 2-rank file that fails with it and passes without."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import leave_group
from test_repro_collective import _run_file

from chipcheck.reproducers import shrink as sk

FAULT = "bitflip:rank=1,bit=25,op=all_reduce,index=3,count=1"


def _rank(rank: int, world: int, root: str, fault: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))

    def model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        m = parallelize_module(m, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    def step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        m(torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).sum().backward()
        opt.step()
        opt.zero_grad()

    bare, bare_opt = model()
    step(bare, bare_opt)
    m, opt = model()
    inj = faults.make_injector(faults.parse(FAULT), rank, "repro") if fault else None
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            step(m, opt)
    if not fault:  # capture never changes the step
        for a, b in zip(bare.parameters(), m.parameters(), strict=True):
            assert torch.equal(a.full_tensor(), b.full_tensor()), f"rank {rank}: capture changed the step"
    leave_group()


@pytest.mark.parametrize("fault", [False, True])
def test_a_tensor_parallel_step_is_captured_and_its_all_reduce_checked(tmp_path: Path, fault: bool) -> None:
    root = tmp_path / "cap"
    mp.start_processes(_rank, args=(2, str(root), fault), nprocs=2, start_method="spawn")
    if not fault:
        with pytest.raises(sk.NotReproducible, match="matches the exact result") as e:
            sk.shrink_collective(str(root))
        assert "not judged" not in str(e.value), str(e.value)
        return
    case = sk.shrink_collective(str(root))
    div = case.divergence
    assert case.op == "_c10d_functional.all_reduce.default" and case.world == 2 and div.collective == "all_reduce"
    assert div.metric.bad == 1, div.metric.line()
    _run_file(tmp_path, case, "bitflip:rank=1,bit=25,index=3")
