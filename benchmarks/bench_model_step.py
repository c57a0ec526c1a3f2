"""Overhead of the model_dp probe's checks against the bare data-parallel training loop.

Two real processes on a gloo group (pinned to one core each where the host has two), the `bench`
model (~3 M parameters). Each repeat times, back to back on both ranks:
- bare:    Trainer.step for K steps (forward, backward, bucketed all-reduce, AdamW);
- checked: probes.model_step.run_dp, the probe's loop: the replica checksum every `replica_every`
           steps and the gradient cross-check every `verify_every` steps (fp64 reference off: it runs once per
           case, outside the loop);
and reports the ratio of the best times (target <= 1.05 at verify_every=32, replica_every=8).

    python benchmarks/bench_model_step.py [--steps 32] [--repeats 3] [--batch 8]
Writes benchmarks/results/model_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    from chipcheck.model import data
    from chipcheck.model.train import Trainer, make_parallel
    from chipcheck.probes import base
    from chipcheck.probes.model_step import StepConfig, model_configs, model_seed, run_dp

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= world:
        os.sched_setaffinity(0, [cores[rank]])
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    par = make_parallel(1)
    ctx = base.ProbeContext(device=torch.device("cpu"), device_kind="cpu", seed=0, profile="bench",
                            timer=base.Timer(torch.device("cpu")), under_test=contextlib.nullcontext, rank=rank,
                            world_size=world, group=lambda: dist.group.WORLD)
    cfg = StepConfig(preset="bench", steps=args.steps, batch_size=args.batch, precisions=("fp32",),
                     reference="off", verify_every=32, replica_every=8)

    def bare() -> None:
        mc, tc = model_configs(cfg, "fp32")
        seed = model_seed(ctx)
        tr = Trainer(mc, tc, seed=seed, par=par)
        batches = [data.batch(mc, seed, s, batch_size=cfg.batch_size, shard=par.dp_rank, shards=par.dp_size)
                   for s in range(cfg.steps)]
        for x, y in batches:
            tr.step(x, y)

    modes = {"bare": bare,
             "checked_verify32": lambda: run_dp(ctx, cfg, "dp/fp32", "fp32", par),
             "checked_verify1": lambda: run_dp(ctx, replace(cfg, verify_every=1), "dp/fp32", "fp32", par)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    if rank == 0:
        # the best of the repeats: a shared host only ever adds time
        med = {m: min(v) for m, v in times.items()}
        res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "world": world, "steps": args.steps,
               "batch": args.batch, "model": "bench", "seconds": times,
               "ratio_verify32": med["checked_verify32"] / med["bare"],
               "ratio_verify1": med["checked_verify1"] / med["bare"]}
        Path(out).write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    out = Path(__file__).parent / "results" / "model_step.json"
    out.parent.mkdir(exist_ok=True)
    mp.spawn(_rank, args=(2, _free_port(), args, str(out)), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
