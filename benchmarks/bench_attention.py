"""Attention probe benchmark: checking overhead and detection rate per bit position (CPU).

    python benchmarks/bench_attention.py [--trials 8] [--threads 2]

1. Overhead: one round of the probe (fwd + bwd through the flash backend, every oracle, the fp64
   reference amortised over the rounds) against the bare SDPA fwd + bwd call, at the CPU
   `standard` shapes.
2. Detection: single-bit flips (one element per call) injected into `out` (forward kernel) and
   `dq` (backward kernel), per bit position, fp32 and bf16; a trial counts as *caught* when a
   value oracle (exact / fp64 reference / non-finite) names the injected tensor in every round
   (verdict wrong), and as *flagged* when the case is anything but pass (repeat-determinism
   sees every flip, as flaky).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import replace

import torch

from chipcheck.probes import attention, base, faults
from chipcheck.probes.attention import AttentionProbe
from chipcheck.results import Oracle, Verdict

FWD = "_scaled_dot_product_flash_attention_for_cpu"
BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"
VALUE_ORACLES = (Oracle.EXACT, Oracle.REFERENCE, Oracle.NONFINITE)


def _ctx(spec: str | None) -> base.ProbeContext:
    inj = faults.make_injector(faults.parse(spec), 0, "attention") if spec else None
    return base.ProbeContext(device=torch.device("cpu"), device_kind="cpu", seed=0, profile="standard",
                             timer=base.Timer(torch.device("cpu")), under_test=inj or contextlib.nullcontext)


def overhead(rounds: int) -> list[tuple[str, float, float, float]]:
    """(case, bare ms, probe ms per round, ratio) at the CPU standard shapes, flash backend."""
    probe = AttentionProbe()
    cfg = replace(probe.config("standard", "cpu", frozenset()), backends=("flash",), repeats=rounds,
                  max_repeats=rounds)
    rows = []
    for case in ("float32/d128/full", "float32/d128/causal", "bfloat16/d128/full", "bfloat16/d128/causal"):
        dtype_name, shape, var = attention.plan(cfg, case)
        inp = attention.random_inputs(shape, var, getattr(torch, dtype_name), 0, "cpu")
        attention.call("flash", inp, var, shape)
        bare = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            attention.call("flash", inp, var, shape)
            bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        probe.run_case(_ctx(None), cfg, case)
        per_round = (time.perf_counter() - t0) / rounds
        b = statistics.median(bare)
        rows.append((case, b * 1e3, per_round * 1e3, per_round / b))
    return rows


def detection(dtype: str, tensor: str, trials: int, exact: bool) -> dict[int, tuple[float, float]]:
    """bit -> (caught rate, flagged rate) for flips injected into `tensor` of a quick-shape case."""
    probe = AttentionProbe()
    cfg = replace(probe.config("quick", "cpu", frozenset()), backends=("flash",))
    case = f"{dtype}/d64/{'exact' if exact else 'full'}"
    op = FWD if tensor == "out" else f"{BWD},output=0"
    width = 32 if dtype == "float32" else 16
    rates = {}
    for bit in range(width):
        caught = flagged = 0
        for t in range(trials):
            o = probe.run_case(_ctx(f"bitflip:rank=0,bit={bit},seed={t},op={op}"), cfg, case)
            named = any(m.tensor == tensor and m.oracle in VALUE_ORACLES for m in o.mismatches)
            caught += o.verdict is Verdict.WRONG and named
            flagged += o.verdict is not Verdict.PASS
        rates[bit] = (caught / trials, flagged / trials)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8, help="flips per (dtype, tensor, bit)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds timed for the overhead")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n## Checking overhead (flash backend, CPU standard shapes: b=2 hq=8 hkv=2 s=256)")
    print(f"{'case':24s} {'bare fwd+bwd ms':>16s} {'probe ms/round':>15s} {'ratio':>6s}")
    for case, bare, probe_ms, ratio in overhead(args.rounds):
        print(f"{case:24s} {bare:16.2f} {probe_ms:15.2f} {ratio:6.2f}")
    print(f"\n## Detection rate per bit position ({args.trials} flips each; caught = wrong with the tensor "
          "named by a value oracle / flagged = not pass)")
    for dtype in ("float32", "bfloat16"):
        for tensor in ("out", "dq"):
            for exact in (False, True):
                rates = detection(dtype, tensor, args.trials, exact)
                mode = "exact" if exact else "random"
                print(f"{dtype:9s} {tensor:3s} {mode:6s} caught: "
                      + " ".join(f"{b}:{c:.2f}" for b, (c, _) in rates.items()))
                print(f"{'':9s} {'':3s} {'':6s} flagged: "
                      + " ".join(f"{b}:{f:.2f}" for b, (_, f) in rates.items()))


if __name__ == "__main__":
    main()
