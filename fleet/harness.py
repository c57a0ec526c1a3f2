"""The harness: what every launcher does around one case, written once.

Used by the local launcher's worker (fleet.worker), the torchrun/Slurm entry point
(fleet.distributed) and the JAX host process (fleet.jax_runner): the process's settings that change
bits (`apply_settings`), the host-wide CPU timing lock (`HostLock`), a torch plan's cases with their
probe contexts (`probe_cases`), the one broad catch around a case (`run_one`), and the case loop all
three run (`CaseLoop`: each `Case` under its lock, its outcome stamped with where, when and under which
settings it was measured and handed on; each path's own surroundings of a case are its hooks;
`error_result` for a case that produced nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..results import DeviceInfo, ErrorInfo, ErrorKind, ProbeResult, Verdict

if TYPE_CHECKING:
    from ..probes.base import CaseOutcome, ProbeContext
    from ..probes.faults import Fault


_Out = TypeVar("_Out", covariant=True)


class RunsCases(Protocol[_Out]):
    """What run_one runs: a probe (probes.base.Probe: a CaseOutcome), or the JAX path's adapter around
    one call (one outcome per rank of a collective)."""

    def run_case(self, ctx: Any, cfg: Any, case: str) -> _Out: ...


def torchrun_env() -> dict[str, Any]:
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "master": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}",
    }


def apply_settings(device_kind: str, threads: int, cores: list[int]) -> dict[str, Any]:
    """Set every knob that changes bits, and return them all for the record."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede CUDA init
    import numpy
    import torch

    if device_kind == "cpu":
        if cores:
            with contextlib.suppress(AttributeError, OSError):
                os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # Reduced-precision split-K reductions round partial sums: the exact oracle forbids them.
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")
    s: dict[str, Any] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a",
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    return s


def host_lock_path() -> str:
    """The one lock file of this user's CPU timing on this host: the local launcher and torchrun
    workers must find the same file (both read TMPDIR the same way)."""
    return os.path.join(tempfile.gettempdir(), f"chipcheck-{os.getuid()}-cpu-timing.lock")


class HostLock:
    """Serialises timed sections of CPU workers sharing a host (a file lock: real processes).

    flock: the kernel releases it when its holder dies. The holder writes who it is into the file
    (pid, since, what, and `until`: when its own watchdog ends its case) while it holds it, so a
    launcher whose worker waits can name a holder that stalls (`lock_holder`), and does not call a
    holder stalled, another run's included, while that holder's own watchdog still runs."""

    def __init__(self, path: str, watchdog_s: float = 0.0):
        self.path = path
        self.watchdog_s = watchdog_s
        self.what = ""
        """What the holder is doing (run, rank, probe, case): written into the lock file."""

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                with contextlib.suppress(OSError):
                    f.seek(0)
                    f.truncate()
                    now = time.time()
                    said = {"pid": os.getpid(), "since": now, "what": self.what}
                    if self.watchdog_s > 0:
                        said["until"] = now + self.watchdog_s
                    f.write(json.dumps(said))
                    f.flush()
                yield
            finally:
                with contextlib.suppress(OSError):
                    f.truncate(0)
                    f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(path: str) -> dict[str, Any] | None:
    """Who holds the host lock at `path`, as its holder wrote it ({pid, since, what[, until]}); None if unsaid."""
    try:
        with open(path) as f:
            d = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("pid"), int) or not isinstance(d.get("since"), int | float):
        return None
    return d


def error_result(run_id: str, seed: int, info: DeviceInfo, rank: int, probe: str, case: str, kind: ErrorKind,
                 message: str) -> ProbeResult:
    """A case that produced no outcome of its own (the worker died, hung or never joined)."""
    now = time.time()
    return ProbeResult(run_id=run_id, host=info.host, rank=rank, device=info.label, fingerprint=info.fingerprint,
                       probe=probe, case=case, verdict=Verdict.ERROR, seed=seed, device_uuid=info.uuid,
                       error=ErrorInfo(kind=kind, message=message), started=now, ended=now)


def run_one(probe: RunsCases[_Out], ctx: Any, cfg: Any, case: str) -> _Out | CaseOutcome:
    """Run one case; any failure to run becomes an `error` outcome (the one broad catch)."""
    from ..probes import base

    try:
        return probe.run_case(ctx, cfg, case)
    except base.Unsupported as e:
        return base.CaseOutcome(case=case, params={}, error=ErrorInfo(kind=ErrorKind.UNSUPPORTED, message=str(e)))
    except base.InvalidConfig as e:
        return base.CaseOutcome(case=case, params={}, error=ErrorInfo(kind=ErrorKind.INVALID_CONFIG, message=str(e)))
    except Exception as e:
        kind = ErrorKind.DEVICE_LOST if "CUDA error" in str(e) else ErrorKind.EXCEPTION
        tb = traceback.format_exc(limit=4).strip().splitlines()
        where = tb[-3].strip() if len(tb) > 2 else ""
        return base.CaseOutcome(case=case, params={},
                                error=ErrorInfo(kind=kind, message=f"{type(e).__name__}: {e} ({where})"))


def capabilities(info: DeviceInfo) -> frozenset[str]:
    from .devices import capabilities

    return capabilities(info)


def torch_device(info: DeviceInfo) -> Any:
    """The torch device a worker for `info` computes on (a CUDA device is made the current one)."""
    import torch

    if info.kind.value == "cuda":
        torch.cuda.set_device(info.index)
        return torch.device("cuda", info.index)
    return torch.device("cpu")


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One case to run: on one rank, or (JAX) on several at once."""

    probe: str
    case: str
    ranks: list[int]
    runs: RunsCases[Any]  # the probe, or the JAX path's adapter around one call (one outcome, or one per rank)
    ctx: ProbeContext | None = None
    cfg: Any = None
    lock: HostLock | None = None  # the host lock it runs under (CPU workers' non-collective cases)
    collective: bool = False
    budget_s: float = 0.0  # its time budget (ctx.deadline), counted once it holds the host; 0: none


def probe_cases(plan: Iterable[tuple[str, list[str]]], *, device: Any, info: DeviceInfo, seed: int, profile: str,
                rank: int, world_size: int, group: Callable[[], Any], lock: HostLock | None, fault_list: list[Fault],
                options: dict[str, str], capabilities: frozenset[str], budget_s: float = 0.0) -> Iterator[Case]:
    """A torch rank's plan, (probe, cases) in order, as cases: per probe its registry entry, config, fault
    injector and context, and the host lock unless it is collective (its ranks run at once)."""
    from ..probes import base, faults

    for probe_name, cases in plan:
        probe = base.get(probe_name)
        cfg = probe.config(profile, info.kind.value, capabilities)
        injector = faults.make_injector(fault_list, rank, probe_name)
        ctx = base.ProbeContext(device=device, device_kind=info.kind.value, seed=seed, profile=profile,
                                timer=base.Timer(device), under_test=injector or contextlib.nullcontext,
                                deadline=None, capabilities=capabilities, rank=rank, world_size=world_size,
                                group=group, host=info.host, host_lock=lock or contextlib.nullcontext,
                                options=dict(options))
        for case in cases:
            yield Case(probe=probe_name, case=case, ranks=[rank], runs=probe, ctx=ctx, cfg=cfg,
                       lock=None if probe.collective else lock, collective=probe.collective, budget_s=budget_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseLoop:
    """One process's cases in turn, and the hooks its path adds around each: `skip` (True: handled without
    running), `watch` (around the whole case, given its time stamp), `wait` (before it queues for its host
    lock), `start` (once it holds it), `running` (around the run itself) and `keep` (each rank's stamped
    result). A case is timed from after `start` (its budget too), or, where one watchdog times the queue
    for the lock as well, from before `watch` (`timed_from_queue`)."""

    run_id: str
    seed: int
    infos: Mapping[int, DeviceInfo]
    settings: dict[str, Any]
    fault_list: list[Fault]
    keep: Callable[[Case, ProbeResult], None]
    skip: Callable[[Case], bool] = lambda c: False
    watch: Callable[[Case, float], contextlib.AbstractContextManager[None]] = lambda c, t: contextlib.nullcontext()
    wait: Callable[[Case, HostLock], None] = lambda c, lock: None
    start: Callable[[Case], None] = lambda c: None
    running: Callable[[Case], contextlib.AbstractContextManager[None]] = lambda c: contextlib.nullcontext()
    timed_from_queue: bool = False

    def run(self, cases: Iterable[Case]) -> None:
        from ..probes import faults

        for c in cases:
            if self.skip(c):
                continue
            started = time.time()
            with self.watch(c, started):
                if c.lock is not None:
                    self.wait(c, c.lock)
                with c.lock() if c.lock is not None else contextlib.nullcontext():
                    self.start(c)
                    started = started if self.timed_from_queue else time.time()
                    if c.ctx is not None:
                        c.ctx.deadline = time.monotonic() + c.budget_s if c.budget_s else None
                    before = dict(faults.HITS)
                    with self.running(c):
                        outs = run_one(c.runs, c.ctx, c.cfg, c.case)
                    hits = {f: n - before.get(f, 0) for f, n in faults.HITS.items()}
            # one device's outcome, or an error every rank of a collective reports
            for rank, outcome in zip(c.ranks, outs if isinstance(outs, list) else [outs] * len(c.ranks), strict=True):
                self.keep(c, self.stamp(c, rank, outcome, started, hits))

    def stamp(self, c: Case, rank: int, outcome: Any, started: float,
              hits: Mapping[Fault, int] | None = None) -> ProbeResult:
        """The outcome as a ProbeResult, with where, when and under which settings it was measured (the
        faults injected on its rank, and, where the case ran here, how many kernel calls each hit)."""
        info = self.infos[rank]
        mine = [f for f in self.fault_list if f.applies_to(rank, c.probe)]
        return ProbeResult(
            run_id=self.run_id, host=info.host, rank=rank, device=info.label, fingerprint=info.fingerprint,
            probe=c.probe, case=c.case, verdict=outcome.verdict, seed=self.seed, params=outcome.params,
            metrics=outcome.metrics, mismatches=outcome.mismatches, repeats=outcome.repeats,
            repeats_bad=outcome.repeats_bad, output_hash=outcome.output_hash,
            repeat_hashes=tuple(getattr(outcome, "repeat_hashes", ())), error=outcome.error,
            settings={**self.settings, "inject": [f.spec() for f in mine],
                      **({"inject_hits": {f.spec(): hits.get(f, 0) for f in mine}} if mine and hits is not None else {})},
            started=started, ended=time.time(), device_uuid=info.uuid, links=outcome.links,
        )
