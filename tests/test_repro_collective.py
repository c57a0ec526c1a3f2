"""A corrupted all_reduce on one rank of a real gloo group shrinks to a single file of the same group
size and reduction (sum over 2 ranks, max and product over 3)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from chipcheck.reproducers import emit
from chipcheck.reproducers import shrink as sk

SPEC = "bitflip:rank=1,bit={bit},op=allreduce_,index=3,count=1"
BIT = {"sum": 25, "max": 30, "product": 25}
"""max: bit 30 of a value in (0.5, 1.5) makes it ~1e38, so the bad payload is the maximum."""


def _rank(rank: int, world: int, port: int, root: str, red: str = "sum") -> None:
    import torch.distributed as dist

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    # A file rendezvous beside the capture: no port to race for with tests running beside it.
    dist.init_process_group("gloo", init_method=f"file://{root}-pg-{port}", rank=rank, world_size=world)
    w = g.uniform((16, 16), 11, "w", device="cpu")
    x = g.uniform((8, 16), 11 + rank, "x", device="cpu")
    inj = faults.make_injector(faults.parse(SPEC.format(bit=BIT[red])), rank, "repro")
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            grad = torch.sigmoid((x @ w).sum(dim=0)) + 0.5  # a rank-local "gradient", in (0.5, 1.5)
            dist.all_reduce(grad, op=getattr(dist.ReduceOp, red.upper()))
            grad.div_(world)
    dist.destroy_process_group()


@pytest.mark.parametrize(("world", "red"), [(2, "sum"), (3, "max"), (3, "product")])
def test_corrupted_all_reduce_becomes_a_file_of_its_group_size_and_reduction(tmp_path: Path, world: int,
                                                                             red: str) -> None:
    root = tmp_path / "cap"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(world, port, str(root), red), nprocs=world, start_method="spawn")
    case = sk.shrink_collective(str(root))
    assert case.world == world and case.op == "c10d.allreduce_.default" and case.divergence.reduce_op == red
    assert case.divergence.metric.bad == 1 and case.divergence.metric.bad_indices == [[3]]
    path = tmp_path / "repro.py"
    path.write_text(emit.render_collective(case, metric_line=case.divergence.metric.line()))
    bad = subprocess.run([sys.executable, str(path), "--inject", f"bitflip:rank=1,bit={BIT[red]},index=3"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert all(f"rank {r}/{world} all_reduce ({red})" in bad.stdout for r in range(world)) and "REPRODUCED" in bad.stdout
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count(f"agrees with the exact {red}") == world
