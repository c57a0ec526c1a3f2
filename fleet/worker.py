"""The worker: one process per device, torchrun's environment, streaming typed results.

The same entry point runs under the local launcher (fleet.launch), and later under torchrun,
Slurm (srun) or a Kubernetes Indexed Job: it reads RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT from the environment and its plan from a JSON file.

Protocol: one JSON object per line on the file descriptor named by CHIPCHECK_RESULT_FD (the
original stdout; the worker's own stdout is redirected to stderr so no stray print can
corrupt the stream): `hello` (device and settings), `wait` (probe, case) before a case queues
for the host's CPU timing lock, `start` (probe, case) once it runs — the launcher's watchdog
times both —, `result` (a ProbeResult), `bye`.

Under the local launcher (`--plan -`) the plan is the first line of stdin and the rest of stdin is
the launcher's control channel: `peer_lost` (a rank of the group is gone: this worker's collective
cases are not run, and say why). The worker dies with its launcher: a parent-death signal
(Linux), and end-of-file on that channel (the launcher's end of the pipe closes when it dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

from ..results import DeviceInfo, ErrorInfo, ErrorKind, ProbeResult, Verdict

if TYPE_CHECKING:
    from ..probes.base import CaseOutcome


_Out = TypeVar("_Out", covariant=True)


class RunsCases(Protocol[_Out]):
    """What run_one runs: a probe (probes.base.Probe: a CaseOutcome), or the JAX path's adapter around
    one call (one outcome per rank of a collective)."""

    def run_case(self, ctx: Any, cfg: Any, case: str) -> _Out: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerPlan:
    """What one worker runs. Written by the launcher, read by the worker."""

    run_id: str
    device: dict[str, Any]  # DeviceInfo.to_dict()
    probes: list[tuple[str, list[str]]]  # (probe, cases) in order
    profile: str
    seed: int
    inject: list[str] = field(default_factory=list)
    cpu_cores: list[int] = field(default_factory=list)
    cpu_threads: int = 1
    lock_path: str = ""
    duration_s: float = 0.0
    options: dict[str, str] = field(default_factory=dict)
    collectives_ok: bool = True  # False for a worker restarted after it was lost itself
    peers_lost: dict[str, str] = field(default_factory=dict)
    """Ranks of the group already lost (rank -> what happened): collective cases are not run."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerPlan:
        d = json.loads(text)
        d["probes"] = [(p, list(c)) for p, c in d["probes"]]
        return cls(**d)


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


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (and exit now if it already has)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(70)


def _control(stream: IO[str], peers_lost: dict[str, str], progress: dict[str, int],
             send: Any = None) -> None:
    """The launcher's control channel: `peer_lost` lines, and `progress?` (how many collective ops
    this rank has entered in its case: a hung rank stops short of its peers); end of file means the
    launcher is gone."""
    for line in stream:
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError, OSError):
            msg = json.loads(line)
            if msg.get("t") == "peer_lost":
                peers_lost[str(int(msg["rank"]))] = str(msg.get("why", ""))
            elif msg.get("t") == "progress?" and send is not None:
                send({"t": "progress", "ops": progress["ops"]})
    os._exit(70)  # no launcher: nobody would read a result, and no process may outlive its run


def _op_counter(progress: dict[str, int]) -> Any:
    """A dispatch mode counting the c10d ops a collective case enters. Entered before the case's
    fault injector, it sees an op only once the injector lets it through (a rank hung there, as a
    hung chip before its collective, is not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if getattr(func, "namespace", "") == "c10d":
                progress["ops"] += 1
            return func(*args, **(kwargs or {}))

    return _Count


def open_channel() -> IO[str]:
    """The stream results go to (the launcher's fd $CHIPCHECK_RESULT_FD, else a copy of stdout);
    stdout itself then points at stderr."""
    fd = int(os.environ.get("CHIPCHECK_RESULT_FD", "-1"))
    if fd < 0:
        # Standalone: keep stdout for results and send everything else to stderr.
        fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the result stream
    return os.fdopen(fd, "w", buffering=1)


def run_plan(plan: WorkerPlan, control: IO[str] | None = None) -> int:
    chan = open_channel()
    peers_lost = dict(plan.peers_lost)
    progress = {"ops": 0}
    env = torchrun_env()
    info = DeviceInfo.from_dict(plan.device)
    rank = env["rank"]
    said = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        with said:  # the control thread answers on the same channel
            chan.write(json.dumps(msg) + "\n")
            chan.flush()

    if control is not None:
        threading.Thread(target=_control, args=(control, peers_lost, progress, send), daemon=True).start()

    settings = apply_settings(info.kind.value, plan.cpu_threads, plan.cpu_cores)
    settings.update({"world_size": env["world_size"], "local_rank": env["local_rank"]})
    import torch

    from ..probes import base, faults

    if info.kind.value == "cuda":
        torch.cuda.set_device(info.index)
        device = torch.device("cuda", info.index)
    else:
        device = torch.device("cpu")
    send({"t": "hello", "rank": rank, "pid": os.getpid(), "settings": settings})
    fault_list = [f for spec in plan.inject for f in faults.parse(spec)]
    # CPU workers share cores: a whole case runs alone on the host (the lock is host-wide), so
    # no device is timed while a neighbour computes. Collective probes run on all ranks at once.
    lock = HostLock(plan.lock_path) if plan.lock_path else None
    timer = base.Timer(device)
    caps = _caps(info)
    group = _lazy_group(info.kind.value, env)
    group_failure = "" if plan.collectives_ok else "this rank's worker was lost earlier in the run"
    stop_faults = faults.start_process_faults(fault_list, rank)
    for probe_name, cases in plan.probes:
        probe = base.get(probe_name)
        cfg = probe.config(plan.profile, info.kind.value, caps)
        injector = faults.make_injector(fault_list, rank, probe_name)
        per_case_s = plan.duration_s / max(1, sum(len(c) for _, c in plan.probes)) if plan.duration_s > 0 else 0.0
        deadline = None
        ctx = base.ProbeContext(device=device, device_kind=info.kind.value, seed=plan.seed, profile=plan.profile,
                                timer=timer, under_test=injector or contextlib.nullcontext,
                                deadline=deadline, capabilities=caps, rank=rank,
                                world_size=env["world_size"], group=group, host=info.host,
                                host_lock=lock or contextlib.nullcontext, options=dict(plan.options))
        exclusive = lock if (lock is not None and not probe.collective) else contextlib.nullcontext
        for case in cases:
            if probe.collective and peers_lost and plan.collectives_ok and str(rank) not in peers_lost:
                # A rank of the group is gone: the group cannot complete, and that is not this chip's doing.
                who = "; ".join(f"peer rank {r} lost ({why})" for r, why in sorted(peers_lost.items()))
                outcome = base.CaseOutcome(case=case, params={}, error=ErrorInfo(
                    kind=ErrorKind.PEER_LOST, message=f"not run: {who}"[:600]))
                send({"t": "start", "probe": probe_name, "case": case, "time": time.time()})
                result = stamp(plan.run_id, plan.seed, info, rank, probe_name, case, outcome, settings, fault_list,
                               time.time())
                send({"t": "result", "result": replace(result, verdict=Verdict.PASS).to_dict()})
                continue
            if probe.collective and group_failure:
                # A failed collective leaves the process group unusable: say so, quickly.
                outcome = base.CaseOutcome(case=case, params={}, error=ErrorInfo(
                    kind=ErrorKind.CRASH, message=f"not run: the process group failed earlier ({group_failure})"))
                send({"t": "start", "probe": probe_name, "case": case, "time": time.time()})
                send({"t": "result", "result": stamp(plan.run_id, plan.seed, info, rank, probe_name, case, outcome, settings,
                                                      fault_list, time.time()).to_dict()})
                continue
            if exclusive is lock and lock is not None:
                # The launcher times the queue for the lock too: a holder that stalls past its own
                # watchdog (another run's hung worker) makes this case an error naming the lock.
                lock.what = f"run {plan.run_id} rank {rank} {probe_name} {case}"
                send({"t": "wait", "probe": probe_name, "case": case, "time": time.time()})
            with exclusive():
                # `start` once the host lock is held: the case's own watchdog times the case alone.
                send({"t": "start", "probe": probe_name, "case": case, "time": time.time()})
                started = time.time()
                # a time-budgeted case's clock starts once it holds the host, not while it queues
                ctx.deadline = time.monotonic() + per_case_s if per_case_s else None
                # CPU only: a Python dispatch mode costs microseconds per op, which a GPU's timed
                # collectives would feel; there the launcher times out the whole hung group instead.
                if probe.collective and info.kind.value == "cpu":
                    progress["ops"] = 0
                    with _op_counter(progress)():
                        outcome = run_one(probe, ctx, cfg, case)
                else:
                    outcome = run_one(probe, ctx, cfg, case)
            result = stamp(plan.run_id, plan.seed, info, rank, probe_name, case, outcome, settings, fault_list, started)
            if probe.collective and outcome.error is not None and not group_failure:
                group_failure = f"{case}: {outcome.error.message[:160]}"
            send({"t": "result", "result": result.to_dict()})
    stop_faults()
    send({"t": "bye"})
    return 0


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


def _lazy_group(kind: str, env: dict[str, Any]) -> Any:
    """A function that initialises torch.distributed (gloo on CPU, NCCL on GPUs) on first use."""

    def get() -> Any:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = float(os.environ.get("CHIPCHECK_PG_TIMEOUT_S", "120"))
            dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", init_method="env://",
                                    rank=env["rank"], world_size=env["world_size"],
                                    timeout=datetime.timedelta(seconds=timeout))
        return dist.group.WORLD

    return get


def _caps(info: DeviceInfo) -> frozenset[str]:
    from .devices import capabilities

    return capabilities(info)


def main(argv: list[str] | None = None) -> int:
    """`python -m chipcheck.worker --plan PLAN.json|-`: the local launcher's worker (chipcheck/worker.py
    sends `run|links`, the torchrun entry point, to chipcheck.torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--plan":
        print("usage: python -m chipcheck.worker run|links [OPTIONS]  (under torchrun, srun, ...)\n"
              "       python -m chipcheck.worker --plan PLAN.json|-      (the local launcher's)", file=sys.stderr)
        return 2
    if argv[1] == "-":  # the local launcher's: the plan on stdin, then its control channel
        die_with_parent(int(os.environ.get("CHIPCHECK_PARENT_PID", "0")))
        plan = WorkerPlan.from_json(sys.stdin.readline())
        return run_plan(plan, control=sys.stdin)
    with open(argv[1]) as f:
        plan = WorkerPlan.from_json(f.read())
    return run_plan(plan)

