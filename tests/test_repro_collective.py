"""A corrupted all_reduce on one rank of a real 2-rank gloo group shrinks to a 2-rank single file."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from chipcheck.reproducers import emit
from chipcheck.reproducers import shrink as sk

SPEC = "bitflip:rank=1,bit=25,op=allreduce_,index=3,count=1"


def _rank(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    # A file rendezvous beside the capture: no port to race for with tests running beside it.
    dist.init_process_group("gloo", init_method=f"file://{root}-pg-{port}", rank=rank, world_size=world)
    w = g.uniform((16, 16), 11, "w", device="cpu")
    x = g.uniform((8, 16), 11 + rank, "x", device="cpu")
    inj = faults.make_injector(faults.parse(SPEC), rank, "repro")
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            grad = (x @ w).sum(dim=0)  # a rank-local "gradient"
            dist.all_reduce(grad)
            grad.div_(world)
    dist.destroy_process_group()


def test_corrupted_all_reduce_becomes_a_two_rank_file(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, str(root)), nprocs=2, start_method="spawn")
    case = sk.shrink_collective(str(root))
    assert case.world == 2 and case.op == "c10d.allreduce_.default"
    assert case.divergence.metric.bad == 1 and 25 in case.divergence.metric.flipped_bits
    assert case.divergence.metric.bad_indices == [[3]]
    path = tmp_path / "repro.py"
    path.write_text(emit.render_collective(case, metric_line=case.divergence.metric.line()))
    bad = subprocess.run([sys.executable, str(path), "--inject", "bitflip:rank=1,bit=25,index=3"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "rank 0/2" in bad.stdout and "rank 1/2" in bad.stdout and "REPRODUCED" in bad.stdout
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("agrees with the exact sum") == 2
