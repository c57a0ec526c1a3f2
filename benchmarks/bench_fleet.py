"""Fleet analysis at scale: one sweep of 100,000 devices, and trends over 365 nightly runs.

    python3 benchmarks/bench_fleet.py [--devices 100000] [--runs 365] [--store-devices 2000]

1. One sweep: a synthetic run (fleet.synthetic, 3 matmul cases per device, 3% failing) judged by
   the real code: consensus groups, speed suspects (fleet.judge.speed), the per-device summary, and
   the quarantine list (codes, slurm commands).
2. History: devices x runs arrays (speed vs peers, verdict, flaky, wrong) with planted slowdowns,
   lemons and flaky turns; fleet.history.analyze finds them (change points, lemons, flaky turns,
   new since the last sweep).
3. The store: bytes per device-run of the SQLite store (every result body kept) and of the
   history index (device_runs), from a `--store-devices` sweep written for real.

Each stage is timed alone, then run again under tracemalloc for its peak Python/numpy memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from chipcheck.fleet import history, quarantine, synthetic
from chipcheck.fleet.judge import speed
from chipcheck.fleet.judge.consensus import consensus
from chipcheck.fleet.judge.verdicts import speed_tables
from chipcheck.fleet.store import Store
from chipcheck.fleet.summary import summarize
from chipcheck.results import SEVERITY, Verdict


def measure(name: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"| {name} | {dt:.2f} s | {peak / 2**20:.0f} MiB |", flush=True)
    return out


def sweep_analysis(f: synthetic.SyntheticFleet) -> tuple[int, int, int]:
    cons, groups = consensus(f.results)
    suspects = speed.suspects(f.results, speed.SpeedPolicy(), *speed_tables())
    # a suspect is slow once its retest confirms it: no synthetic device runs one, so the planted
    # slow devices (fleet.synthetic) stand for the confirmed ones
    slow = f.slow
    missed = {j.rank for j in slow} - {s.rank for s in suspects}
    assert not missed, f"the speed rule must suspect every planted slow device; missed {sorted(missed)[:10]}"
    summary = summarize(f.run_id, f.devices, f.results, cons + slow, groups, profile="standard", seed=0,
                                  started=f.started, ended=f.started + 600)
    plans = quarantine.collect(summary)
    cmds, _ = quarantine.commands(plans, quarantine.Format.SLURM, f.run_id)
    return len(slow), len(suspects), len(cmds)


def fleet_arrays(n: int, runs: int, seed: int = 0) -> history.FleetArrays:
    rng = np.random.default_rng(seed)
    ratio = rng.normal(1.0, 0.015, (n, runs))
    ratio[rng.random((n, runs)) < 0.02] = np.nan  # nights a device was busy and not swept
    for row in rng.choice(n, 50, replace=False):  # planted slowdowns
        ratio[row, rng.integers(runs // 2, runs - 5):] *= 0.85
    verdict = np.where(np.isnan(ratio), -1, SEVERITY[Verdict.PASS]).astype(np.int8)
    wrong = np.zeros((n, runs), bool)
    flaky = np.zeros((n, runs), bool)
    for row in rng.choice(n, 30, replace=False):  # lemons
        wrong[row, [-7, -2]] = True
    for row in rng.choice(n, 30, replace=False):  # turned flaky
        flaky[row, [-4, -1]] = True
    verdict[wrong] = SEVERITY[Verdict.WRONG]
    verdict[flaky & ~wrong] = SEVERITY[Verdict.FLAKY]
    return history.FleetArrays(uuids=[f"GPU-{i}" for i in range(n)], hosts=[f"node{i // 8}" for i in range(n)],
                               devices=[f"cuda:{i % 8}" for i in range(n)], run_ids=[f"run{k}" for k in range(runs)],
                               ratio=ratio, verdict=verdict, flaky=flaky, wrong=wrong)


def store_size(n: int, runs: int = 3) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "r.db"
        store = Store(db)
        for k in range(runs):
            f = synthetic.fleet(n, seed=k, run_id=f"run{k}", started=1.79e9 + k)
            summary, judgements = synthetic.judge(f)
            store.begin_run(f.run_id, host="h", profile="standard", seed=0, argv=[], config={}, started=f.started)
            store.add_devices(f.run_id, f.devices.items())
            with store.conn:  # one transaction per run: the benchmark measures size, not fsyncs
                for r in f.results:
                    store.add_result(r)
            store.add_judgements(f.run_id, judgements)
            store.end_run(f.run_id, summary.verdict)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = os.path.getsize(db)
        history.index(store)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.conn.execute("VACUUM")
        after = os.path.getsize(db)
        store.close()
    return before / (n * runs), (after - before) / (n * runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=365)
    ap.add_argument("--store-devices", type=int, default=2_000)
    a = ap.parse_args()
    t = time.perf_counter()
    f = synthetic.fleet(a.devices, fail_fraction=0.03)
    print(f"synthetic sweep: {a.devices} devices, {len(f.results)} results, built in {time.perf_counter() - t:.1f}s")
    print("| stage | time | peak traced memory |\n|---|---|---|")
    n_slow, n_suspects, n_cmds = measure(f"one sweep: consensus + speed suspects + summary + quarantine ({a.devices:,} devices)",
                             lambda: sweep_analysis(f))
    arrays = fleet_arrays(a.devices, a.runs)
    rep = measure(f"trends over {a.runs} runs x {a.devices:,} devices (+ new since last sweep)",
                  lambda: history.analyze(arrays))
    print(f"\nslow devices: {n_slow} (all among {n_suspects} speed suspects, each to be retested); hosts drained: {n_cmds}; trend findings: "
          + ", ".join(f"{c}={sum(1 for x in rep.findings if x.code.code == c)}"
                      for c in ("CC-TRD-001", "CC-LEM-001", "CC-TRD-002"))
          + f"; new failures in the last sweep: {len(rep.new_failures)}")
    full, idx = store_size(a.store_devices)
    print(f"store: {full:,.0f} bytes per device-run (every result body, 3 cases), history index "
          f"{idx:,.0f} bytes per device-run")
    print(f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
