"""The speed retest through JAX/XLA: probes/retest.py's turns, with JAX's GEMM, on one host's devices.

The judge (fleet.judge.speed) calls a device `slow` only when an interleaved retest confirms it; the
JAX path ran none, so a slow TPU or GPU under JAX was only ever noted. Here the suspect and its peer
take turns on the GEMM of the dtype it is slow in (`gemm.DTYPE`, the backend's `JaxKernel`:
dot_general at HIGHEST precision), in ABBA rounds (`retest.interleaved`), each turn keeping its best of
`calls` calls, timed as the matmul probe times them (`jax_backend.timed`: wall time on accelerators,
CPU time on forced host devices) and slowed by a `slow` fault as that probe's are (the rank's
`Injector`, op `dot_general`). The config, case names, pairs (option `retest_gemm.DTYPE`) and the
outcome's params (`turn_s`) are the torch probe's, so the judge reads both alike.

Unlike a torch CPU worker, which holds its own core, forced host CPU devices share every core of the
one process, so other work on the host falls on suspect and peer turns alike and the ABBA pairing
cancels it; nor can /proc/stat tell one turn's load from the next at this length (a suspect's turns
read "151% busy", its peer's 25%, where the same turns run alone read 98-100% for both). So no
host-load figure is kept, and the judge's busy-host rule does not apply here.

One process drives every device of a single host, so a turn is alone by construction. A multi-host
job is not retested (its suspects stay notes): turns across processes would need a barrier per turn.
Copy and link retests are not on the JAX path (no JAX probe suspects them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import jax_backend as jb
from .base import CaseOutcome, InvalidConfig
from .retest import EXTENDED, RetestProbe, interleaved, keep_turns, parse_case, parse_pairs

SEED = 0
"""The GEMM inputs' seed (counter-based: the same A and B on every device and run)."""


def cases(cfg: RetestProbe.Config) -> list[str]:
    return ["gemm", f"gemm/{EXTENDED}"]


def run_ranks(devices: list[Any], cfg: RetestProbe.Config, case: str,
              injectors: Sequence[jb.Injector] | Mapping[int, jb.Injector],
              options: Mapping[str, str]) -> dict[int, CaseOutcome]:
    """One retest case over this host's `devices` (rank = position); an outcome per rank, with turn
    times for the ranks the pairs in `options` involve."""
    import jax

    kernel_name, base, dtype, stage = parse_case(case)
    if base != "gemm":
        raise InvalidConfig(f"retest case {case!r}: only GEMM retests are on the JAX path")
    if any(d.process_index != jax.process_index() for d in devices):
        raise InvalidConfig("retest: a multi-host JAX job is not retested (turns across processes)")
    pairs = parse_pairs(options.get(f"retest_{kernel_name}", ""))
    rounds = cfg.extended_rounds if stage else cfg.rounds
    involved = sorted({r for p in pairs for r in p})
    if unknown := [r for r in involved if r >= len(devices)]:
        raise InvalidConfig(f"retest: rank {unknown[0]} is not one of this host's {len(devices)} JAX devices")
    dtype = dtype or cfg.gemm_dtype
    n = cfg.gemm_n_by_dtype.get(dtype, cfg.gemm_n)
    params = {"pairs": [list(p) for p in pairs], "rounds": rounds, "calls": cfg.calls,
              "kernel": f"{dtype} GEMM n={n}", "dtype": dtype, "backend": "jax"}
    outs = {r: CaseOutcome(case=case, params=dict(params)) for r in range(len(devices))}
    calls = {r: _gemm(devices[r], dtype, n, injectors[r]) for r in involved}
    for r in involved:
        for _ in range(2):  # compilation, allocations, clocks ramping: never a turn's time
            calls[r]()
    times: dict[int, list[float]] = {r: [] for r in involved}

    def turn(r: int) -> None:
        times[r].append(min(calls[r]() for _ in range(cfg.calls)))

    interleaved(rounds, involved, turn, lambda: None)
    for r in involved:
        keep_turns(outs[r], times[r], None)
    return outs


def _gemm(device: Any, dtype: str, n: int, inj: jb.Injector) -> Any:
    """A callable that runs one GEMM on `device` and returns its seconds (a `slow` fault's stall included)."""
    from .backends.jax import OP, JaxBackend  # imports jax: the registry imports this module without it

    be = JaxBackend(device, inj)
    k = be.kernel(dtype)
    a, b = k.prepare(be.uniform((n, n), SEED, "retest.a"), be.uniform((n, n), SEED, "retest.b"))
    return lambda: be.run(OP, k.out_name, lambda: k(a, b))[1]
