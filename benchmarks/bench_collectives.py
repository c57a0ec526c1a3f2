"""Collective and link benchmarks.

    python benchmarks/bench_collectives.py busbw          # all_reduce probe vs a bare dist.all_reduce loop
    python benchmarks/bench_collectives.py links          # wall time of `chipcheck links` for 4, 8, 16 workers
    python benchmarks/bench_collectives.py all

The busbw ratio is measured in one set of processes, the bare loop and the probe's timed loop
interleaved per size, so a noisy machine moves both sides. Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (1 << 16, 1 << 20, 1 << 22)
ITERS = 10
ROUNDS = 5


def _busbw_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from chipcheck.probes import base
    from chipcheck.probes.collectives import CollectivesProbe, bus_factor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    probe = CollectivesProbe()
    cpu = torch.device("cpu")
    ctx = base.ProbeContext(device=cpu, device_kind="cpu", seed=0, profile="standard", timer=base.Timer(cpu),
                            rank=rank, world_size=world, group=lambda: dist.group.WORLD)
    rows = []
    for size in SIZES:
        cfg = CollectivesProbe.Config(ops=("all_reduce_sum",), dtypes=("float32",), min_bytes=size, max_bytes=size,
                                      factor=2, iters=ITERS, timed_loops=1, checks=1)
        bare, probed = [], []
        buf = torch.ones(size // 4)
        for _ in range(ROUNDS):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(ITERS):
                dist.all_reduce(buf)
            bare.append(size / ((time.perf_counter() - t0) / ITERS) / 1e9 * bus_factor("all_reduce_sum", world))
            out_ = probe.run_case(ctx, cfg, "all_reduce_sum/float32")
            assert out_.verdict.value == "pass", out_.mismatches
            probed.append(out_.metrics["busbw_gbps_best"])
        rows.append((size, statistics.median(bare), statistics.median(probed)))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def busbw(world: int = 2) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        mp.spawn(_busbw_worker, args=(world, 29000 + os.getpid() % 1000, out), nprocs=world)
        rows = json.loads(Path(out).read_text())
    print(f"\n### all_reduce busbw: probe vs bare loop (gloo, {world} CPU ranks, {time.strftime('%Y-%m-%d')})\n")
    print("| size | bare busbw (GB/s) | probe busbw (GB/s) | ratio |")
    print("|---|---|---|---|")
    for size, bare, probed in rows:
        print(f"| {size // 1024} KiB | {bare:.3f} | {probed:.3f} | {probed / bare:.2f} |")


def links(counts: tuple[int, ...] = (4, 8, 16)) -> None:
    print(f"\n### `chipcheck links --devices cpu:N` wall time ({time.strftime('%Y-%m-%d')})\n")
    print("| N | rounds | directions | wall (s) | exit |")
    print("|---|---|---|---|---|")
    for n in counts:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "l.json"
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "chipcheck.cli", "links", "--devices", f"cpu:{n}", "--db",
                                f"{d}/r.db", "--json", str(out), "-q", "--timeout", "900"], capture_output=True,
                               text=True, timeout=1800)
            dt = time.perf_counter() - t0
            data = {}
            with contextlib.suppress(Exception):
                data = json.loads(out.read_text())
            sweep = data.get("link_sweep", {})
            print(f"| {n} | {sweep.get('rounds', '?')} | {len(data.get('links', []))} | {dt:.1f} | {p.returncode} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["busbw", "links", "all"])
    a = ap.parse_args()
    if a.what in ("busbw", "all"):
        busbw()
    if a.what in ("links", "all"):
        links()


if __name__ == "__main__":
    main()
