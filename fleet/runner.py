"""`chipcheck run` as a library call: validate, discover, launch, store, judge, summarise.

Everything that can be wrong with the user's input is checked before a worker starts, so a bad
flag never leaves a half-written run behind.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..results import DeviceInfo, Judgement, ProbeResult, RunSummary
from . import devices
from .launch import LaunchRequest, run_local
from .session import RunSession
from .store import Store
from .summary import summarize

DEFAULT_TIMEOUT_S = {"quick": 120.0, "standard": 600.0, "nightly": 1800.0, "burnin": 0.0}
PROFILES = tuple(DEFAULT_TIMEOUT_S)


class UsageError(ValueError):
    """Bad input: one line for the user, exit 2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    devices: str = "auto"
    """`auto`, `cpu:N` or `cuda:0,3`."""
    probes: tuple[str, ...] = ()
    """Probes to run, in order (empty: every default probe the devices allow)."""
    profile: str = "quick"
    """Time budget per device: quick, standard, nightly, burnin."""
    seed: int = 0
    """Base seed of every input (recorded with every result)."""
    inject: tuple[str, ...] = ()
    """Fault specs (see probes.faults)."""
    timeout_s: float | None = None
    """Watchdog per probe case; default by profile."""
    duration_s: float = 0.0
    """Total time for --profile burnin."""
    min_gap: float = 0.10
    """Relative throughput shortfall that counts as slow."""
    options: dict[str, str] = field(default_factory=dict)
    """Probe options (e.g. pairing for the links probe)."""
    baselines: str = ""
    """A TOML file of per-SKU achievable speeds that overrides or extends the shipped table."""
    argv: list[str] = field(default_factory=list)


def validate(opts: RunOptions) -> None:
    from ..probes import base, faults

    if opts.profile not in PROFILES:
        raise UsageError(f"unknown profile {opts.profile!r}; known: {', '.join(PROFILES)}")
    if opts.profile == "burnin" and opts.duration_s <= 0:
        raise UsageError("--profile burnin needs --duration, e.g. --duration 10m")
    known = base.registry()
    for p in opts.probes:
        if p not in known:
            raise UsageError(f"unknown probe {p!r}; known: {', '.join(sorted(known))}")
    for spec in opts.inject:
        try:
            faults.parse(spec)
        except faults.InjectSpecError as e:
            raise UsageError(str(e)) from None
    if opts.timeout_s is not None and not (math.isfinite(opts.timeout_s) and opts.timeout_s > 0):
        raise UsageError(f"--timeout must be > 0 seconds and finite, not {opts.timeout_s}")
    if not 0.0 < opts.min_gap < 1.0:
        raise UsageError("--min-gap must be between 0 and 1 (e.g. 0.1 for 10%)")
    try:
        devices.parse_spec(opts.devices)
    except devices.DeviceSpecError as e:
        raise UsageError(str(e)) from None
    baseline_table(opts)


def new_run_id(prefix: str = "") -> str:
    """A run's id: when it started (sortable) and a random suffix (unique across hosts)."""
    return prefix + time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def plan_probes(opts: RunOptions, devs: list[DeviceInfo]) -> list[tuple[str, list[str]]]:
    """Cases per probe; all devices of a run share one kind, so one plan serves all."""
    from ..probes import base, faults

    kind = devs[0].kind.value
    caps = devices.capabilities(devs[0])
    names = opts.probes or tuple(
        n for n, cls in base.registry().items()
        if (cls.default or opts.profile in getattr(cls, "default_profiles", ())) and cls.min_devices <= len(devs))
    out = []
    for name in names:
        if base.registry()[name].min_devices > len(devs):
            raise UsageError(f"probe {name!r} needs at least {base.registry()[name].min_devices} devices; "
                             f"--devices {opts.devices} gives {len(devs)}")
        probe = base.get(name)
        try:
            cfg = probe.config(opts.profile, kind, caps)
        except base.InvalidConfig as e:
            raise UsageError(str(e)) from None
        out.append((name, probe.cases(cfg)))
    probes = [n for n, _ in out] + ["retest"]  # the retest runs when the judge asks for it
    if why := faults.never_fires(opts.inject, len(devs), probes):
        raise UsageError(why)
    return out


def execute(opts: RunOptions, store: Store, *, on_result: Callable[[ProbeResult], None] | None = None,
            on_start: Callable[[int, str, str], None] | None = None) -> RunSummary:
    """Run the probes on every device; every result is in `store` the moment it exists."""
    validate(opts)
    try:
        devs = devices.discover(opts.devices)
    except devices.DeviceSpecError as e:
        raise UsageError(str(e)) from None
    if len({d.kind for d in devs}) > 1:
        raise UsageError("one run covers one device kind; run CPU and GPU devices separately")
    probes = plan_probes(opts, devs)
    run_id = new_run_id()
    timeout = opts.timeout_s or DEFAULT_TIMEOUT_S[opts.profile] or max(600.0, opts.duration_s * 1.5)
    host = socket.gethostname()
    started = time.time()
    req = LaunchRequest(run_id=run_id, devices=devs, probes=probes, profile=opts.profile, seed=opts.seed,
                        timeout_s=timeout, inject=list(opts.inject), duration_s=opts.duration_s,
                        options=dict(opts.options), epoch=started)
    # issue 20: SIGINT/SIGTERM/SIGHUP end the run here: its workers are killed (run_local), what it
    # measured is already stored, and the session marks the run `interrupted` before the exception goes on.
    with RunSession(store, run_id, on_result=on_result) as run:
        run.begin(host=host, profile=opts.profile, seed=opts.seed, argv=opts.argv or sys.argv,
                  config={"devices": opts.devices, "probes": list(opts.probes), "inject": list(opts.inject),
                          "timeout_s": timeout, "duration_s": opts.duration_s, "min_gap": opts.min_gap,
                          # what the judgement read besides the results: a run judged again later
                          # (reloaded after an interrupt) reads them again
                          "baselines": os.path.abspath(opts.baselines) if opts.baselines else "",
                          "declared": os.path.abspath(opts.options["declared"]) if opts.options.get("declared") else "",
                          "pid": os.getpid(), "plan": probes})
        run.add_devices(devs)
        run_local(req, run.keep, on_start)
        retest(req, run.results, opts, run.keep, on_start)
        summary = run.finish(lambda results: judge(run_id, dict(enumerate(devs)), results, opts, started, store))
    return summary


def retest(req: LaunchRequest, results: list[ProbeResult], opts: RunOptions, keep: Callable[[ProbeResult], None],
           on_start: Callable[[int, str, str], None] | None = None) -> None:
    """Retest every slow suspect (device or link) against a peer, interleaved and alone on the host,
    and once more with more rounds where that was inconclusive (nothing to do, and no time spent,
    when the run has no suspect). Its results join the run's."""
    from .judge import speed

    def stage(options: dict[str, str]) -> None:
        run_local(replace(req, probes=[(speed.RETEST, speed.retest_cases(options))],
                          options={**req.options, **options}, duration_s=0.0), keep, on_start)

    retest_stages(results, dict(enumerate(req.devices)), opts.min_gap, stage)


def retest_stages(results: list[ProbeResult], devs: dict[int, DeviceInfo], min_gap: float,
                  run_stage: Callable[[dict[str, str]], None]) -> None:
    """The judge's retest stages (fleet.judge.verdicts.retest_options: the suspects, then the inconclusive
    ones with more rounds): `run_stage(options)` runs one, its results joining `results`; until the judge
    asks for nothing more, or a stage brings nothing back (the next would ask the same again). The local
    launcher and the JAX path share it."""
    from .judge.verdicts import retest_options

    while options := retest_options(results, devs, min_gap):
        before = len(results)
        run_stage(options)
        if len(results) == before:
            return


def baseline_table(opts: RunOptions) -> Any:
    """The per-SKU baselines: the shipped table, with the user's file (--baselines) over it."""
    from .judge import baselines

    try:
        return baselines.load(opts.baselines or None)
    except baselines.BaselineError as e:
        raise UsageError(str(e)) from None


def judge(run_id: str, devs: dict[int, DeviceInfo], results: list[ProbeResult], opts: RunOptions,
          started: float, store: Store | None = None) -> tuple[RunSummary, list[Judgement]]:
    """Fleet analysis (consensus, slowness, links, blame) and the per-device verdicts; with `store`,
    each device is also held against its own stored history."""
    from .judge.verdicts import fleet_verdicts, own_history

    declared = load_declared(opts.options["declared"]) if opts.options.get("declared") else None
    own = own_history(store, devs, results, run_id, started) if store is not None else []
    v = fleet_verdicts(devs, results, min_gap=opts.min_gap, declared=declared, baselines=baseline_table(opts),
                       own=own)
    summary = summarize(run_id, devs, results, v.judgements, v.groups, profile=opts.profile, seed=opts.seed,
                        started=started, ended=time.time(), links=v.links, findings=v.findings,
                        exonerate=v.library.exonerate, fleet_verdict=v.library.fleet_verdict)
    return summary, v.judgements


def load_declared(path: str) -> dict[int, tuple[str, ...]]:
    """A declared topology: TOML with a `[ranks]` table, rank -> [building, rack, host] (outermost first)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return {int(k): tuple(str(x) for x in v) for k, v in data["ranks"].items()}
    except (OSError, KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--declared {path}: not a topology file ([ranks] rank = [\"rack\", \"host\"]): {e}") \
            from None
