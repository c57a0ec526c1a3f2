"""Synthetic stored history for the history, trend and quarantine tests: real store, made-up results."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from chipcheck.fleet import synthetic
from chipcheck.fleet.store import Store
from chipcheck.results import ProbeResult


def store_runs(db: Path, n_devices: int, n_runs: int, *, speed: dict[tuple[int, int], float] | None = None,
               fail: dict[int, float] | None = None, seed: int = 0) -> list[str]:
    """`n_runs` judged runs of a synthetic fleet into the store at `db`; returns their ids, oldest first.

    speed[(rank, run)] scales that device's throughput in that run; fail[run] is its fail fraction.
    """
    speed, fail = speed or {}, fail or {}
    store = Store(db)
    ids = []
    for k in range(n_runs):
        run_id = f"2026{k:04d}T000000-syn"
        started = 1.79e9 + k * 86400.0
        f = synthetic.fleet(n_devices, fail_fraction=fail.get(k, 0.0), seed=seed * 1000 + k, run_id=run_id,
                            started=started)
        results = [_scaled(r, speed.get((r.rank, k), 1.0)) for r in f.results]
        f = replace(f, results=results)
        summary, judgements = synthetic.judge(f)
        store.begin_run(run_id, host="node0000", profile="standard", seed=0, argv=[], config={}, started=started)
        store.add_devices(run_id, f.devices.items())
        for r in results:
            store.add_result(r)
        store.add_judgements(run_id, judgements)
        store.end_run(run_id, summary.verdict)
        ids.append(run_id)
    store.close()
    return ids


def _scaled(r: ProbeResult, factor: float) -> ProbeResult:
    if factor == 1.0 or "tflops_best" not in r.metrics:
        return r
    return replace(r, metrics={**r.metrics, "tflops_best": r.metrics["tflops_best"] * factor})
