"""The harness: what every launcher does around one case, written once.

Used by the local launcher's worker (fleet.worker), the torchrun/Slurm entry point
(fleet.distributed) and the JAX host process (fleet.jax_runner): the process's settings that change
bits (`apply_settings`), the host-wide CPU timing lock (`HostLock`), the probe context
(`context`), the one broad catch around a case (`run_one`), and the result stamped with where,
when and under which settings it was measured (`stamp`; `error_result` for a case that produced
nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..results import DeviceInfo, ErrorInfo, ErrorKind, ProbeResult, Verdict

if TYPE_CHECKING:
    from ..probes.base import CaseOutcome, ProbeContext


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


class HostLock:
    """Serialises timed sections of CPU workers sharing a host (a file lock: real processes).

    flock: the kernel releases it when its holder dies. The holder writes who it is into the file
    (pid, since, what) while it holds it, so a launcher whose worker waits can name a holder that
    stalls (`lock_holder`)."""

    def __init__(self, path: str):
        self.path = path
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
                    f.write(json.dumps({"pid": os.getpid(), "since": time.time(), "what": self.what}))
                    f.flush()
                yield
            finally:
                with contextlib.suppress(OSError):
                    f.truncate(0)
                    f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(path: str) -> dict[str, Any] | None:
    """Who holds the host lock at `path`, as its holder wrote it ({pid, since, what}); None if unsaid."""
    try:
        with open(path) as f:
            d = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("pid"), int) or not isinstance(d.get("since"), int | float):
        return None
    return d


def stamp(run_id: str, seed: int, info: DeviceInfo, rank: int, probe: str, case: str, outcome: Any,
          settings: dict[str, Any], fault_list: list[Any], started: float) -> ProbeResult:
    """The outcome as a ProbeResult, with where, when and under which settings it was measured.

    The one place every launcher (local worker, torchrun worker, the in-process JAX path) makes it.
    """
    return ProbeResult(
        run_id=run_id, host=info.host, rank=rank, device=info.label, fingerprint=info.fingerprint,
        probe=probe, case=case, verdict=outcome.verdict, seed=seed, params=outcome.params,
        metrics=outcome.metrics, mismatches=outcome.mismatches, repeats=outcome.repeats,
        repeats_bad=outcome.repeats_bad, output_hash=outcome.output_hash, error=outcome.error,
        settings={**settings, "inject": [f.spec() for f in fault_list if f.applies_to(rank, probe)]},
        started=started, ended=time.time(), device_uuid=info.uuid, links=outcome.links,
    )


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


def context(*, device: Any, info: DeviceInfo, seed: int, profile: str, rank: int, world_size: int,
            group: Callable[[], Any], lock: HostLock | None, injector: Any, options: dict[str, str],
            capabilities: frozenset[str]) -> ProbeContext:
    """The probe context one probe's cases run in (its deadline is set per case)."""
    from ..probes import base

    return base.ProbeContext(device=device, device_kind=info.kind.value, seed=seed, profile=profile,
                             timer=base.Timer(device), under_test=injector or contextlib.nullcontext,
                             deadline=None, capabilities=capabilities, rank=rank, world_size=world_size,
                             group=group, host=info.host, host_lock=lock or contextlib.nullcontext,
                             options=options)
