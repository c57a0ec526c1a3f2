"""A device against its own past: `slow` when its speed now is well below the median of its own runs.

The store's `device_runs` index keeps each device's speed relative to its fingerprint peers in each
run; a whole group drifting together leaves that ratio at 1.0. This judgement compares absolute
figures instead (the same speed keys as the baselines: matmul TFLOP/s per dtype, copy GB/s, collective
busbw), read from the stored results themselves, so no schema change is needed.

Rule (per device and speed key): with at least `min_runs` past figures, the device is `slow` when its
figure now is more than `drop` below their median AND the gap exceeds `noise_k` robust standard
deviations of its own past (1.4826 x MAD): a device whose own figures swing by 25% run to run is not
called slow for a 22% dip. Figures are per run the best over that run's cases (noise only lowers speed).

Like with like: the past figures are those measured the way the figure now was, on the same shape
(GEMM dimensions, copy bytes, collective group and message sizes: a profile's own) under the same
fingerprint (SKU and software: a driver, CUDA, cuDNN or torch upgrade may move a kernel's speed on
every device at once). A healthy H200's bf16 GEMM runs 519-566 TFLOP/s at the quick profile's 4096
and 733 at the burn-in's 8192: against a week of nightly runs, a quick run was 25% "below its own
median". A device whose history holds no such figure yet is not judged.

The closer look wins: a GEMM drop on a device that this run's interleaved retest (fleet.judge.speed)
measured at its peer's speed in that dtype is noted, not called slow. The retest times the device
turn by turn against a peer, alone on the host; the probe's figure was this run's dip (a clean CPU
run: 29% below its own median over 10 runs, cleared by retest at 1.00x its peer). A group that
drifts together makes no peer suspect and no retest, so its drop still stands.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from ...results import Judgement, ProbeResult, Verdict
from .baselines import Sample, SpeedKey, best_speeds, speed_samples

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["MAD_SIGMA", "history_judgements", "run_speeds", "speed_history", "withdraw_retested"]

MAD_SIGMA = 1.4826
"""MAD x this = the standard deviation of normally distributed figures."""
DAY_S = 86400.0


def history_judgements(current: dict[int, float], history: dict[int, list[float]], *, min_runs: int = 5,
                       drop: float = 0.2, noise_k: float = 3.0, window: str = "30-day", probe: str = "*",
                       case: str = "*", unit: str = "") -> list[Judgement]:
    """`slow` for each rank whose figure in `current` is more than `drop` (a fraction) below the median
    of its own past figures in `history` and further below it than `noise_k` robust sigmas of that past.

    Ranks with fewer than `min_runs` past figures are not judged. `window` names the history span in
    reasons ("28% below its own 30-day median"); `probe`, `case` and `unit` label the judgements."""
    if not 0 < drop < 1 or min_runs < 1 or noise_k < 0:
        raise ValueError(f"need 0 < drop < 1, min_runs >= 1, noise_k >= 0; got {drop}, {min_runs}, {noise_k}")
    out = []
    for rank, now in sorted(current.items()):
        past = [v for v in history.get(rank, []) if v > 0]
        if len(past) < min_runs or now <= 0:
            continue
        med = statistics.median(past)
        sigma = MAD_SIGMA * statistics.median(abs(v - med) for v in past)
        gap = med - now
        if now >= (1 - drop) * med or gap <= noise_k * sigma:
            continue
        below = gap / med
        u = f" {unit}" if unit else ""
        out.append(Judgement(
            rank=rank, probe=probe, case=case, verdict=Verdict.SLOW,
            reason=(f"{below:.0%} below its own {window} median: {now:.4g}{u} now against {med:.4g}{u} "
                    f"over {len(past)} runs (own spread {sigma / med:.1%}; threshold {drop:.0%})"),
            metrics={"speed": now, "own_median": med, "own_sigma": sigma, "ratio_to_own_median": now / med,
                     "own_runs": float(len(past))}))
    return out


def run_speeds(results: Iterable[ProbeResult], key: SpeedKey) -> dict[int, Sample]:
    """Each rank's best sample for `key` in one run's results (the `current` of history_judgements, by
    its value; its shape and fingerprint select the past it is judged against)."""
    return {rank: s for (rank, k), s in best_speeds(speed_samples(results)).items() if k == key}


def speed_history(store: Store, uuid: str, key: SpeedKey, *, now: float, days: float = 30.0,
                  exclude_run: str | None = None, like: Sample | None = None) -> list[float]:
    """One device's (by UUID) best figure for `key` in each of its stored runs that started in the
    `days` before `now`, oldest run first; `exclude_run` (the run being judged) is left out; with
    `like`, only figures of its shape and fingerprint.

    Reads the results table through its device_uuid index (no schema change); bodies are parsed with
    the same rules as a live run's (speed_samples)."""
    per_run: dict[str, float] = {}
    for r in store.device_results(uuid, key.probe, since=now - days * DAY_S, until=now):
        if r.run_id == exclude_run:
            continue
        for s in speed_samples([r]):
            if like is not None and (s.shape, s.fingerprint) != (like.shape, like.fingerprint):
                continue
            if s.key == key and s.value > per_run.get(r.run_id, 0.0):
                per_run[r.run_id] = s.value
    return list(per_run.values())


def withdraw_retested(own: list[Judgement], results: list[ProbeResult], retests: list[Judgement]) -> list[Judgement]:
    """`own` (history_judgements' matmul drops) with each drop that a retest judgement in `retests`
    cleared for that rank and dtype turned into a note (`pass`, saying both)."""
    from ...probes.retest import split_kernel
    from .speed import RETEST

    dtypes = {(r.rank, r.case.partition("/")[0]): str(r.params.get("dtype", ""))
              for r in results if r.probe == RETEST}
    cleared: dict[tuple[int, str], Judgement] = {}
    for j in retests:
        base, dtype = split_kernel(j.case)
        if j.probe == RETEST and j.verdict is Verdict.PASS and base == "gemm":
            cleared.setdefault((j.rank, dtype or dtypes.get((j.rank, j.case), "")), j)
    out = []
    for j in own:
        c = cleared.get((j.rank, j.case)) if j.probe == "matmul" and j.verdict is Verdict.SLOW else None
        out.append(j if c is None else replace(
            j, verdict=Verdict.PASS, reason=f"not called slow: {j.reason}; but {c.reason}"))
    return out
