"""`chipcheck run --backend jax`: the probes through JAX/XLA on every device of this host, in-process.

JAX's model is one process per host driving all of its devices (TPU chips/cores, GPUs, or forced
host CPU devices), so there are no per-device workers here: this process runs the matmul case on
each device in turn and each collectives case once over all of them (one SPMD program), stamps
the outcomes as the torch workers do (ProbeResult), stores each as it arrives, then judges with the
same fleet analysis (runner.judge: consensus per fingerprint, slowness against peers) and returns
the same RunSummary, so the terminal/JSON/HTML reports and exit codes are the torch path's.

Not here yet: attention and the other probes, a per-case watchdog (so `hang`/`crash` faults are
refused), multi-host runs through jax.distributed.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from ..results import ProbeResult, RunSummary
from . import jax_devices
from .runner import RunOptions, UsageError, judge, validate
from .store import Store
from .worker import stamp

PROBES = ("matmul", "attention", "collectives")


class _Call:
    """Adapts a closure to worker._run_one's probe interface, so the JAX path shares its one broad catch."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn

    def run_case(self, ctx: Any, cfg: Any, case: str) -> Any:
        return self.fn()


def validate_jax(opts: RunOptions) -> None:
    """What the in-process JAX path cannot do, refused before anything runs (exit 2)."""
    from ..probes import faults

    validate(opts)
    if opts.devices != "auto":
        raise UsageError(f"--backend jax runs on every device JAX sees on this host; drop --devices {opts.devices} "
                         "(choose devices with JAX_PLATFORMS / CUDA_VISIBLE_DEVICES / XLA_FLAGS)")
    unknown = [p for p in opts.probes if p not in PROBES]
    if unknown:
        raise UsageError(f"probe {unknown[0]!r} is not on the JAX path yet; --backend jax runs: {', '.join(PROBES)}")
    for spec in opts.inject:
        for f in faults.parse(spec):
            if f.kind not in ("bitflip", "stuck", "nan", "slow"):
                raise UsageError(f"--inject {spec!r}: {f.kind} needs a per-case watchdog, which --backend jax "
                                 f"does not have yet; use bitflip, stuck, nan or slow")
    if opts.profile == "burnin":
        raise UsageError("--profile burnin is not on the JAX path yet; use quick, standard or nightly")


def execute(opts: RunOptions, store: Store, *, on_result: Callable[[ProbeResult], None] | None = None) -> RunSummary:
    """Run the JAX probes on this host's JAX devices; every result is in `store` the moment it exists."""
    from ..probes import base, faults
    from ..probes import jax_backend as jb

    validate_jax(opts)
    settings = jb.init()
    try:
        jdevs, infos = jax_devices.discover()
    except jax_devices.DeviceSpecError as e:
        raise UsageError(str(e)) from None
    devs = dict(enumerate(infos))
    names = opts.probes or tuple(p for p in PROBES if base.registry()[p].min_devices <= len(infos))
    if "collectives" in names and len(infos) < 2:
        raise UsageError(f"probe 'collectives' needs at least 2 devices; JAX sees {len(infos)} on this host")
    # TPUs and GPUs take the accelerator shapes; the profiles' "cuda" rows are those
    profile_kind = "cpu" if infos[0].kind.value == "cpu" else "cuda"
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    started = time.time()
    store.begin_run(run_id, host=socket.gethostname(), profile=opts.profile, seed=opts.seed,
                    argv=opts.argv or sys.argv,
                    config={"devices": opts.devices, "probes": list(names), "inject": list(opts.inject),
                            "backend": "jax", "min_gap": opts.min_gap, "pid": os.getpid()})
    store.add_devices(run_id, enumerate(infos))
    fault_list = [f for spec in opts.inject for f in faults.parse(spec)]
    collected: list[ProbeResult] = []

    def keep(rank: int, probe: str, outcome: Any, t0: float) -> None:
        r = stamp(run_id, opts.seed, devs[rank], rank, probe, outcome.case, outcome, settings, fault_list, t0)
        store.add_result(r)
        collected.append(r)
        if on_result:
            on_result(r)

    for name in names:
        injectors = [jb.Injector.for_rank(fault_list, r, name) for r in range(len(jdevs))]
        if name == "attention":
            _run_attention(jdevs, opts.profile, opts.seed, injectors, keep)
            continue
        probe = base.get(name)
        try:
            cfg = probe.config(opts.profile, profile_kind, frozenset())
        except base.InvalidConfig as e:
            raise UsageError(str(e)) from None
        if name == "matmul":
            _run_matmul(jdevs, cfg, opts.seed, injectors, keep)
        else:
            _run_collectives(jdevs, cfg, injectors, keep)
    summary, judgements = judge(run_id, devs, collected, opts, started)
    store.add_judgements(run_id, judgements)
    store.end_run(run_id, summary.verdict)
    return summary


def _run_matmul(jdevs: list[Any], cfg: Any, seed: int, injectors: list[Any], keep: Any) -> None:
    from ..probes import jax_matmul
    from .worker import _run_one

    for case in jax_matmul.cases(cfg):
        for rank, d in enumerate(jdevs):
            t0 = time.time()
            outcome = _run_one(_Call(lambda d=d, rank=rank, case=case: jax_matmul.run_case(
                d, cfg, case, seed, injectors[rank])), None, cfg, case)
            keep(rank, "matmul", outcome, t0)


ATTENTION_SEQ = {"quick": 64, "standard": 256, "nightly": 512}
"""Sequence length of the JAX attention probe per profile (CPU-sized; a TPU run wants more)."""


def _run_attention(jdevs: list[Any], profile: str, seed: int, injectors: list[Any], keep: Any) -> None:
    from ..probes import jax_attention
    from .worker import _run_one

    cfg = jax_attention.Config(seq=ATTENTION_SEQ.get(profile, 64))
    for case in jax_attention.cases():
        for rank, d in enumerate(jdevs):
            t0 = time.time()
            outcome = _run_one(_Call(lambda d=d, rank=rank, case=case: jax_attention.run_case(
                d, cfg, case, seed, injectors[rank])), None, cfg, case)
            keep(rank, "attention", outcome, t0)


def _run_collectives(jdevs: list[Any], cfg: Any, injectors: list[Any], keep: Any) -> None:
    from ..probes import jax_collectives
    from .worker import _run_one

    for case in jax_collectives.cases(cfg):
        t0 = time.time()
        outs = _run_one(_Call(lambda case=case: jax_collectives.run_case(jdevs, cfg, case, injectors)), None, cfg,
                        case)
        if not isinstance(outs, list):  # an error outcome: every rank of the collective reports it
            outs = [outs] * len(jdevs)
        for rank, outcome in enumerate(outs):
            keep(rank, "collectives", outcome, t0)


