"""A synthetic fleet's results, shaped exactly like a real run's: for report benchmarks, demos and tests.

No device runs anything: results are made up deterministically from a seed, with a chosen fraction
of devices failing in each way chipcheck knows (wrong bits, slow, flaky, error), then folded by the
real fleet.summary code. Slowness is made up here directly
(its judge, fleet.judge.speed, needs a retest no synthetic device can run).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from ..results import (
    DeviceInfo,
    DeviceKind,
    ErrorInfo,
    ErrorKind,
    Judgement,
    Mismatch,
    Oracle,
    ProbeResult,
    RunSummary,
    Verdict,
)
from .judge.consensus import consensus
from .summary import summarize

CASES = (("float32/exact", "float32", 60.0), ("bfloat16/random", "bfloat16", 700.0), ("float16/random", "float16",
                                                                                        690.0))
GPUS_PER_HOST = 8


def devices(n: int) -> dict[int, DeviceInfo]:
    """`n` GPUs, 8 per host, in two fingerprint groups (two driver versions)."""
    out = {}
    for rank in range(n):
        driver = "550.54" if rank % 10 else "535.161"
        fp = hashlib.sha256(driver.encode()).hexdigest()[:12]
        uid = hashlib.sha256(f"gpu{rank}".encode()).hexdigest()
        out[rank] = DeviceInfo(index=rank % GPUS_PER_HOST, kind=DeviceKind.CUDA, name="NVIDIA H100 80GB HBM3",
                               memory_bytes=80 * 2**30, uuid=f"GPU-{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:28]}",
                               host=f"node{rank // GPUS_PER_HOST:04d}", fingerprint=fp,
                               fingerprint_fields={"sku": "H100", "driver": driver})
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class SyntheticFleet:
    """What a real run would have stored: devices, every case result, and the fleet's own judgements."""

    run_id: str
    started: float
    seed: int
    devices: dict[int, DeviceInfo]
    results: list[ProbeResult]
    slow: list[Judgement]


def fleet(n: int, *, fail_fraction: float = 0.03, seed: int = 0, run_id: str = "20261125T000000-synthetic",
          started: float = 1795564800.0) -> SyntheticFleet:
    """`n` devices of which about `fail_fraction` fail (in turn: wrong, wrong, slow, flaky, error)."""
    rng = random.Random(seed)
    devs = devices(n)
    bad = rng.sample(range(n), k=min(n, round(n * fail_fraction)))
    mode = {r: ("wrong", "wrong", "slow", "flaky", "error")[i % 5] for i, r in enumerate(bad)}
    results: list[ProbeResult] = []
    slow: list[Judgement] = []
    for rank, d in devs.items():
        m = mode.get(rank, "")
        speed = 0.72 if m == "slow" else rng.gauss(1.0, 0.015)
        for case, dtype, tflops in CASES:
            results.append(_result(rank, d, case, dtype, tflops * speed, m, rng, run_id, started))
        if m == "slow":
            slow.append(Judgement(rank=rank, probe="matmul", case="*", verdict=Verdict.SLOW,
                                  reason=f"slow: tflops_best is {speed:.2f}x the median of its fingerprint "
                                         f"peers (median over {len(CASES)} cases; threshold 0.90x)",
                                  metrics={"ratio_to_peers": speed}))
    return SyntheticFleet(run_id=run_id, started=started, seed=seed, devices=devs, results=results, slow=slow)


def judge(f: SyntheticFleet) -> tuple[RunSummary, list[Judgement]]:
    """The run summary and every fleet judgement (consensus recounted, slowness as generated)."""
    cons, groups = consensus(f.results)
    judgements = cons + f.slow
    summary = summarize(f.run_id, f.devices, f.results, judgements, groups, profile="standard", seed=f.seed,
                        started=f.started, ended=f.started + 600.0)
    return summary, judgements


def run(n: int, *, fail_fraction: float = 0.03, seed: int = 0, run_id: str = "20261125T000000-synthetic",
        started: float = 1795564800.0) -> RunSummary:
    """A judged run of `n` synthetic devices (see `fleet`)."""
    return judge(fleet(n, fail_fraction=fail_fraction, seed=seed, run_id=run_id, started=started))[0]


def _result(rank: int, d: DeviceInfo, case: str, dtype: str, tflops: float, mode: str, rng: random.Random,
            run_id: str, started: float) -> ProbeResult:
    verdict, mismatches, error, bad_repeats = Verdict.PASS, [], None, 0
    out_hash = "" if case.endswith("exact") else hashlib.md5(f"{case}-ok".encode()).hexdigest()
    if mode == "wrong" and case == "float32/exact":
        bit = rng.choice((20, 20, 20, 27, 3))
        row, col = rng.randrange(8192), rng.randrange(8192)
        verdict, bad_repeats = Verdict.WRONG, 3
        mismatches = [Mismatch(oracle=Oracle.EXACT, tensor="C", bad_elements=1, total_elements=8192 * 8192,
                               first_indices=[[row, col]], tiles=[[row // 128, col // 128]], expected=[0.0],
                               actual=[float(2.0 ** (bit - 149)) if bit < 23 else 2.0], max_abs_error=1.0,
                               expected_bits=["0" * 32], actual_bits=["0" * (31 - bit) + "1" + "0" * bit],
                               bit_histogram={bit: 3}, note="tile=128")]
    elif mode == "wrong" and case == "bfloat16/random":
        out_hash = hashlib.md5(f"{case}-bad-{rank}".encode()).hexdigest()  # the consensus oracle's case
    elif mode == "flaky" and case == "bfloat16/random":
        verdict, bad_repeats = Verdict.FLAKY, 1
        mismatches = [Mismatch(oracle=Oracle.REPEAT, tensor="C", bad_elements=2, total_elements=8192 * 8192,
                               first_indices=[[11, 4000], [12, 4000]], tiles=[[0, 31]], bit_histogram={7: 1, 9: 1},
                               max_abs_error=0.25)]
    elif mode == "error" and case == "float16/random":
        verdict = Verdict.ERROR
        error = ErrorInfo(kind=ErrorKind.TIMEOUT, message=f"matmul {case} on {d.host} {d.label} (rank {rank}) "
                                                          f"exceeded its 600s watchdog; worker killed")
    metrics = {} if error else {"tflops": tflops * 0.97, "tflops_best": tflops, "time_ms": 1.0e3 / tflops}
    return ProbeResult(run_id=run_id, host=d.host, rank=rank, device=d.label, fingerprint=d.fingerprint,
                       probe="matmul", case=case, verdict=verdict, seed=0, params={"dtype": dtype, "m": 8192},
                       metrics=metrics, mismatches=mismatches, repeats=4, repeats_bad=bad_repeats,
                       output_hash="" if error else out_hash, error=error, started=started, ended=started + 1.0,
                       device_uuid=d.uuid)
