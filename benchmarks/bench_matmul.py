"""Matmul probe benchmarks: checking overhead, detection per bit position, false positives, quick time.

    python benchmarks/bench_matmul.py overhead     # probe with all oracles vs bare torch.matmul (ratio)
    python benchmarks/bench_matmul.py overhead-jax # the same probe on a JAX device vs bare dot_general
    python benchmarks/bench_matmul.py detection    # fraction of single-bit flips caught, per bit position
    python benchmarks/bench_matmul.py false-positives --runs 50   # clean device-runs (4 devices each)
    python benchmarks/bench_matmul.py quick        # wall time of `chipcheck run --profile quick`
    python benchmarks/bench_matmul.py all

Ratios are measured in one process, one after the other, so a noisy shared machine moves both sides.
Prints Markdown rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chipcheck.probes import base, faults
from chipcheck.probes.matmul import Kernel, MatmulProbe


def _ctx(inject: str | None = None, seed: int = 0) -> base.ProbeContext:
    inj = faults.make_injector(faults.parse(inject), 0, "matmul") if inject else None
    cpu = torch.device("cpu")
    return base.ProbeContext(device=cpu, device_kind="cpu", seed=seed, profile="standard", timer=base.Timer(cpu),
                             under_test=inj or contextlib.nullcontext)


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def overhead(rounds: int = 3) -> None:
    """Whole probe (inputs, warm-up, repeats, every oracle) vs the same number of bare GEMMs."""
    torch.set_num_threads(1)
    p = MatmulProbe()
    cfg = p.config("standard", "cpu", frozenset())
    print(f"\n### Checking overhead (CPU standard profile, {machine()}, {time.strftime('%Y-%m-%d')})\n")
    print("| dtype | n | GEMM calls | bare GEMMs (ms) | probe, both cases (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for dtype, n in cfg.sizes.items():
        kernel = Kernel.for_dtype(dtype, torch.device("cpu"))
        a = torch.rand(n, n).to(kernel.in_dtype)
        b = torch.rand(n, n).to(kernel.in_dtype)
        bare, probe = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            calls = 0
            for case in (f"{dtype}/exact", f"{dtype}/random"):
                out = p.run_case(_ctx(), cfg, case)
                assert out.verdict.value == "pass"
                calls += 1 + out.repeats  # one warm-up + the repeats the time budget allowed
            probe.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(calls):
                kernel(a, b)
            bare.append(time.perf_counter() - t0)
        b_ms, p_ms = 1e3 * statistics.median(bare), 1e3 * statistics.median(probe)
        print(f"| {dtype} | {n} | {calls} | {b_ms:.1f} | {p_ms:.1f} | {p_ms / b_ms:.3f} |")


def overhead_jax(rounds: int = 3) -> None:
    """The JAX path: the one matmul definition on a JAX device (backends.jax: checks on the device)
    vs as many bare jitted dot_general calls at HIGHEST precision."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from chipcheck.probes import jax_backend as jb
    from chipcheck.probes import jax_matmul

    jb.init()
    dev = jax.devices()[0]
    p = MatmulProbe()
    cfg = p.config("standard", "cpu", frozenset())
    print(f"\n### Checking overhead, JAX path (CPU standard profile, {platform.node()}, jax {jax.__version__}, "
          f"{dev.platform}, {time.strftime('%Y-%m-%d')})\n")
    print("| dtype | n | GEMM calls | bare dot_general (ms) | probe, both cases (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for dtype, n in cfg.sizes.items():
        if dtype not in jax_matmul.DTYPES:
            continue
        dt = getattr(jnp, dtype)
        mm = jax.jit(lambda a, b, dt=dt: lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                          precision=lax.Precision.HIGHEST, preferred_element_type=dt))
        a = jax.device_put(jnp.asarray(torch.rand(n, n).numpy()).astype(dt), dev)
        b = jax.device_put(jnp.asarray(torch.rand(n, n).numpy()).astype(dt), dev)
        jax.block_until_ready(mm(a, b))
        bare, probe = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            calls = 0
            for case in (f"{dtype}/exact", f"{dtype}/random"):
                out = jax_matmul.run_case(dev, cfg, case, 0, jb.Injector([]))
                assert out.verdict.value == "pass", out.mismatches
                calls += 1 + out.repeats
            probe.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(mm(a, b))
            bare.append(time.perf_counter() - t0)
        b_ms, p_ms = 1e3 * statistics.median(bare), 1e3 * statistics.median(probe)
        print(f"| {dtype} | {n} | {calls} | {b_ms:.1f} | {p_ms:.1f} | {p_ms / b_ms:.3f} |")


def detection(trials: int = 12) -> None:
    """Single-bit flips, one element per call, at every bit position of fp32 and bf16 outputs.

    'caught' = the device's verdict for the probe is not pass, counting the exact case, the random
    case's own oracles and fleet consensus (its output hash against a clean device's).
    'Freivalds alone' = the random case's Freivalds check fired.
    """
    torch.set_num_threads(1)
    p = MatmulProbe()
    sizes = {"float32": 128, "bfloat16": 128}
    cfg = MatmulProbe.Config(sizes=sizes, repeats=3, max_repeats=3)
    print(f"\n### Detection of single-bit flips ({trials} trials per position, n=128, {time.strftime('%Y-%m-%d')})\n")
    print("| dtype | bits | caught (all oracles) | Freivalds alone | exact alone |")
    print("|---|---|---|---|---|")
    for dtype, width in (("float32", 32), ("bfloat16", 16)):
        clean = {s: p.run_case(_ctx(seed=s), cfg, f"{dtype}/random").output_hash for s in range(trials)}
        rows = []
        for bit in range(width):
            caught = fr = ex = 0
            for s in range(trials):
                spec = f"bitflip:rank=0,bit={bit},seed={s}"
                e = p.run_case(_ctx(spec, seed=s), cfg, f"{dtype}/exact")
                r = p.run_case(_ctx(spec, seed=s), cfg, f"{dtype}/random")
                bad_exact = e.verdict.value != "pass"
                bad_random = r.verdict.value != "pass" or r.output_hash != clean[s]
                caught += bad_exact or bad_random
                ex += bad_exact
                fr += any(m.oracle.value == "freivalds" for m in r.mismatches)
            rows.append((bit, caught / trials, fr / trials, ex / trials))
        _rows(dtype, rows)


def _rows(dtype: str, rows: list[tuple[int, float, float, float]]) -> None:
    """Group consecutive bit positions with the same rates into one row."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][1:] != rows[start][1:]:
            lo, hi = rows[start][0], rows[i - 1][0]
            _, c, f, e = rows[start]
            print(f"| {dtype} | {lo}-{hi} | {c:.0%} | {f:.0%} | {e:.0%} |")
            start = i


def false_positives(runs: int = 50, devices: int = 4) -> None:
    """Clean `chipcheck run` invocations; every device must pass."""
    bad = total = 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        for i in range(runs):
            out = Path(d) / f"r{i}.json"
            subprocess.run([sys.executable, "-m", "chipcheck.cli", "run", "--devices", f"cpu:{devices}", "--probes",
                            "matmul", "--seed", str(i), "--db", f"{d}/r.db", "--json", str(out), "-q"],
                           capture_output=True, timeout=600)
            data = json.loads(out.read_text())
            for dev in data["devices"]:
                total += 1
                bad += dev["verdict"] != "pass"
    print(f"\n### False positives ({time.strftime('%Y-%m-%d')})\n")
    print(f"{bad} of {total} clean device-runs flagged ({runs} runs of cpu:{devices}, matmul quick, "
          f"{time.time() - t0:.0f} s)")


def quick(devices: str = "cpu:2") -> None:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "chipcheck.cli", "run", "--devices", devices, "--profile", "quick",
                            "--db", f"{d}/r.db", "-q"], capture_output=True, text=True, timeout=1200)
        dt = time.perf_counter() - t0
    print(f"\n### `chipcheck run --devices {devices} --profile quick` ({time.strftime('%Y-%m-%d')})\n")
    print(f"{dt:.1f} s wall, exit {p.returncode} ({p.stdout.strip().splitlines()[-1] if p.stdout else ''})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["overhead", "overhead-jax", "detection", "false-positives", "quick", "all"])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--trials", type=int, default=12)
    a = ap.parse_args()
    if a.what in ("overhead", "all"):
        overhead()
    if a.what in ("overhead-jax", "all"):
        overhead_jax()
    if a.what in ("detection", "all"):
        detection(a.trials)
    if a.what in ("false-positives", "all"):
        false_positives(a.runs)
    if a.what in ("quick", "all"):
        quick()


if __name__ == "__main__":
    main()
