"""Speed verdicts: false slows on clean runs, and sensitivity to a process-wide slow chip.

    python3 benchmarks/bench_speed.py clean [--runs 50] [--devices cpu:4] [--write-mib 800] [--tenant-core 1]
    python3 benchmarks/bench_speed.py sensitivity [--runs 20] [--factors 1.10,1.15,1.20,1.30] [--dtype bfloat16]
        [--after-s 5]
    (clean and sensitivity take --backend jax: `chipcheck run --backend jax` on N forced host CPU devices)
    python3 benchmarks/bench_speed.py drift [--runs 15]
    python3 benchmarks/bench_speed.py links [--runs 20] [--devices cpu:8]
    python3 benchmarks/bench_speed.py links --fault endpoint|link [--runs 8] [--factors 5] [--devices cpu:4]

clean: N clean `chipcheck run --profile quick`; every device-run that is not `pass` is a false
flag (target 0). Also how many runs had a speed suspect (and so an interleaved retest), and the
median wall time of runs with and without one (what the retest adds). `--write-mib N` writes N MiB
to a file just before each run (as an install does, no fsync): the host's writeback then shares the
memory system with the run, and a CPU device's copy speed is noted, never judged (fleet.judge.speed).
`--tenant-core C` runs a memory-bound process pinned to core C through each run (another tenant of
the host): a retest whose turns found the host busier for the suspect than for its peer is not judged.
sensitivity: per slowdown factor F, N runs with `slow:rank=R,factor=F,scope=process` (R rotating
over the ranks): the fraction in which the slow device is called `slow`, and the runs in which any
other device was flagged at all (target 0). `--dtype D` slows only the device's GEMMs in D (a chip
whose bf16 tensor-core path is slow, its other dtypes at full speed: retested in D). `--after-s S`
spares the run's first S seconds (a chip slow only once warm: the early matmul probe sees it at full speed).
links: N clean `chipcheck links` sweeps; every directed link (or device) not `pass` is a false flag
(target 0), and how many sweeps retested a suspect link. With `--fault`, per factor F, N sweeps
with a slow NIC (`endpoint`: `slow:rank=R,op=send,factor=F,scope=process`, every send of rank R) or
a slow cable (`link`: the same with `peer=R+1`, only R's sends to R+1), R rotating: how often the
fault is named (the device `slow`; the link R->R+1 `slow` and no device), and the sweeps in which
any other device or a link without R was flagged (target 0).
drift: N clean 0.8 s float32 burns in this process on one thread (as a CPU worker runs them): the
range of their end/start throughput ratio and how many the burn's own timeline would make a
throttle candidate: why a timeline alone never calls a chip slow (fleet/judge/throttle.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdicts import machine, run  # noqa: E402

QUICK = ("--profile", "quick")


def target(devices: str, backend: str) -> tuple[str, ...]:
    """The run's device arguments: `--devices cpu:N`, or for `--backend jax` N forced host devices (JAX takes
    every device it sees: XLA_FLAGS, set here for the child runs)."""
    if backend == "torch":
        return ("--devices", devices)
    os.environ.update({"JAX_PLATFORMS": "cpu",
                       "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices.split(':')[1]}"})
    return ("--backend", "jax")


TENANT = """import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
x, i = [0.0] * 4_000_000, 0  # a working set larger than the caches
while True:
    x[i % len(x)] += 1.0
    i += 7919
"""


def clean(runs: int, devices: str, write_mib: int = 0, tenant_core: int | None = None, backend: str = "torch") -> None:
    flags, walls_retest, walls_plain, noted, busy = [], [], [], 0, 0
    for i in range(runs):
        tenant = (subprocess.Popen([sys.executable, "-c", TENANT, str(tenant_core)])
                  if tenant_core is not None else None)
        try:
            with tempfile.NamedTemporaryFile() as f:
                for _ in range(write_mib):
                    f.write(os.urandom(2**20))
                res = run(*target(devices, backend), *QUICK, "--seed", str(i))
        finally:
            if tenant is not None:
                tenant.kill()
                tenant.wait()
        noted += sum(", not judged: " in n for ns in res.speed_notes.values() for n in ns)
        busy += sum(n.startswith("speed suspect not judged") for ns in res.speed_notes.values() for n in ns)
        bad = {k: v for k, v in res.verdicts.items() if v != "pass"}
        flags += [f"run {i}: rank {k} {v} {res.slow_reasons.get(k, [''])[0][:200]}" for k, v in bad.items()]
        (walls_retest if res.retested else walls_plain).append(res.wall_s)
        kernels = sorted({m.group(1) for ns in res.speed_notes.values() for n in ns
                          if (m := re.search(r"rounds of the (\S+) kernel", n))})
        print(f"run {i:>3}: {'retest ' if res.retested else '       '}{res.wall_s:5.0f}s  "
              f"{' '.join(f'{k}:{v}' for k, v in sorted(res.verdicts.items()))}"
              f"{'  retested on ' + ', '.join(kernels) if kernels else ''}", flush=True)
    n = runs * len(res.verdicts)
    print(f"false flags: {len(flags)} of {n} device-runs; runs with a speed suspect (retested): "
          f"{len(walls_retest)} of {runs}; host-shared kernel notes: {noted}; retests not judged (other work in "
          f"the suspect's turns): {busy}")
    if walls_plain:
        print(f"median wall without a retest {statistics.median(walls_plain):.1f}s", end="")
    if walls_retest:
        print(f", with one {statistics.median(walls_retest):.1f}s", end="")
    print()
    for f in flags:
        print("  " + f)


def links(runs: int, devices: str) -> None:
    flags, retested, walls = [], 0, []
    for i in range(runs):
        res = run("--devices", devices, "--seed", str(i), command="links")
        bad = [f"rank {k} {v}" for k, v in res.verdicts.items() if v != "pass"] + res.links_flagged
        flags += [f"sweep {i}: {b[:200]}" for b in bad]
        retested += res.retested
        walls.append(res.wall_s)
        print(f"sweep {i:>3}: {'retest ' if res.retested else '       '}{res.wall_s:5.0f}s  "
              f"{len(bad)} flagged", flush=True)
    print(f"false flags: {len(flags)} in {runs} sweeps; sweeps with a suspect link (retested): {retested}; "
          f"median wall {statistics.median(walls):.1f}s")
    for f in flags:
        print("  " + f)


def link_sensitivity(runs: int, devices: str, factors: list[float], fault: str) -> None:
    world = int(devices.split(":")[1])
    print(f"{'factor':>6}  {'named':>7}  {'others flagged':>14}")
    for f in factors:
        hit, others, notes = 0, 0, []
        for i in range(runs):
            r, peer = i % world, (i + 1) % world
            spec = f"slow:rank={r},op=send,factor={f},scope=process" + (f",peer={peer}" if fault == "link" else "")
            res = run("--devices", devices, "--seed", str(i), "--inject", spec, command="links")
            flagged = {int(x.split("->")[0]): x for x in res.links_flagged}  # src -> a flagged link of it
            links = [x.split(" ")[0] for x in res.links_flagged]
            devs = {k: v for k, v in res.verdicts.items() if v != "pass"}
            named = devs == {r: "slow"} if fault == "endpoint" else (f"{r}->{peer}" in links and not devs)
            hit += named
            wrong = [f"rank {k} {v}" for k, v in devs.items() if k != r] + [
                x for x in links if str(r) not in x.split("->")]
            others += bool(wrong)
            notes += [f"factor {f} sweep {i}: {w}" for w in wrong]
            print(f"  factor {f} sweep {i} rank {r}: {'named' if named else 'MISSED':<6} {res.wall_s:4.0f}s  "
                  f"devices {devs or '{}'} links {links}  {flagged.get(r, '')[:160]}", flush=True)
        print(f"{f:>6}  {hit:>3}/{runs:<3}  {others:>8}/{runs}", flush=True)
        for n in notes:
            print("  " + n)


def sensitivity(runs: int, devices: str, factors: list[float], dtype: str = "", backend: str = "torch",
                after_s: float = 0.0) -> None:
    world = int(devices.split(":")[1])
    print(f"{'slowdown':>8}  {'called slow':>11}  {'others flagged':>14}")
    for f in factors:
        hit, others, notes = 0, 0, []
        for i in range(runs):
            r = i % world
            res = run(*target(devices, backend), *QUICK, "--seed", str(i), "--inject",
                      f"slow:rank={r},factor={f},scope=process" + (f",dtype={dtype}" if dtype else "")
                      + (f",after_s={after_s:g}" if after_s else ""))
            hit += res.verdicts[r] == "slow"
            said = (res.slow_reasons.get(r) or res.speed_notes.get(r) or ["not a suspect"])[0]
            print(f"  factor {f} run {i} rank {r}: {res.verdicts[r]:<5} {res.wall_s:4.0f}s  {said[:160]}", flush=True)
            wrong = {k: v for k, v in res.verdicts.items() if k != r and v != "pass"}
            others += bool(wrong)
            notes += [f"factor {f} run {i}: rank {k} {v}" for k, v in wrong.items()]
        print(f"{f - 1:>8.0%}  {hit:>5}/{runs:<5}  {others:>8}/{runs}", flush=True)
        for n in notes:
            print("  " + n)


def drift(runs: int) -> None:
    import contextlib
    import dataclasses

    import torch

    from chipcheck.fleet.judge import throttle
    from chipcheck.probes import base, burn
    from chipcheck.results import ProbeResult

    torch.set_num_threads(1)
    probe = burn.BurnProbe()
    cfg = dataclasses.replace(probe.config("quick", "cpu", frozenset()), duration_s=0.8)
    ratios, candidates = [], 0
    for i in range(runs):
        ctx = base.ProbeContext(device=torch.device("cpu"), device_kind="cpu", seed=i, profile="quick",
                                timer=base.Timer(torch.device("cpu")), under_test=contextlib.nullcontext)
        out = probe.run_case(ctx, cfg, "float32")
        r = ProbeResult(run_id="b", host="h", rank=0, device="cpu:0", fingerprint="f", probe="burn",
                        case="float32", verdict=out.verdict, seed=i, params=out.params, metrics=out.metrics)
        ratios.append(out.metrics["throughput_ratio"])
        candidates += bool(throttle.candidates([r], 0.10))
        print(f"burn {i:>3}: end/start {ratios[-1]:.2f}  onset {out.metrics.get('throttle_onset_s')}", flush=True)
    print(f"clean burns: end/start {min(ratios):.2f}-{max(ratios):.2f} over {runs}; "
          f"throttle candidates by the timeline alone: {candidates} of {runs}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("clean", "sensitivity", "drift", "links"))
    ap.add_argument("--runs", type=int, default=0)
    ap.add_argument("--devices", default="")
    ap.add_argument("--factors", default="")
    ap.add_argument("--fault", choices=("endpoint", "link"), default="",
                    help="links: a slow NIC (every send of a rank) or a slow cable (its sends to one peer)")
    ap.add_argument("--write-mib", type=int, default=0, help="clean: MiB written to a file just before each run")
    ap.add_argument("--dtype", default="", help="sensitivity: slow only the GEMMs in this dtype")
    ap.add_argument("--after-s", type=float, default=0.0, help="sensitivity: the fault spares the run's first S s")
    ap.add_argument("--backend", choices=("torch", "jax"), default="torch", help="clean, sensitivity: the run's backend")
    ap.add_argument("--tenant-core", type=int, default=None,
                    help="clean: a memory-bound process pinned to this core through each run")
    a = ap.parse_args()
    a.devices = a.devices or ("cpu:8" if a.what == "links" and not a.fault else "cpu:4")
    factors = [float(x) for x in (a.factors or ("5" if a.fault else "1.10,1.15,1.20,1.30")).split(",")]
    print(f"# bench_speed {a.what} {datetime.date.today()} on {machine()}: {a.devices}"
          + (" (--backend jax)" if a.backend == "jax" else "")
          + (f", slow in {a.dtype} only" if a.what == "sensitivity" and a.dtype else "")
          + (f", once {a.after_s:g} s into the run" if a.what == "sensitivity" and a.after_s else "")
          + (f", a slow {a.fault}" if a.what == "links" and a.fault else ""))
    if a.what == "clean":
        clean(a.runs or 50, a.devices, a.write_mib, a.tenant_core, a.backend)
    elif a.what == "links" and a.fault:
        link_sensitivity(a.runs or 8, a.devices, factors, a.fault)
    elif a.what == "links":
        links(a.runs or 20, a.devices)
    elif a.what == "drift":
        drift(a.runs or 15)
    else:
        sensitivity(a.runs or 20, a.devices, factors, a.dtype, a.backend, a.after_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
