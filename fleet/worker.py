"""The worker: one process per device under the local launcher, streaming typed results.

The launcher (fleet.launch) starts `python -m chipcheck.worker --plan -` per device with torchrun's
environment (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT); the plan is the first
line of stdin. Results go out as fleet.protocol messages on the file descriptor named by
CHIPCHECK_RESULT_FD (the worker's own stdout is redirected to stderr so no stray print can
corrupt the stream): Hello, Wait before a case queues for the host's CPU timing lock, Start once
it runs (the launcher's watchdog times both), Result, Bye.

The rest of stdin is the launcher's control channel: PeerLost (a rank of the group is gone: this
worker's collective cases are not run, and say why) and ProgressQuery. The worker dies with its
launcher: a parent-death signal (Linux), and end-of-file on that channel (the launcher's end of
the pipe closes when it dies). What happens around one case is fleet.harness's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any

from ..results import DeviceInfo, ErrorInfo, ErrorKind, ProbeResult, Verdict
from . import protocol
from .harness import (
    Case,
    CaseLoop,
    HostLock,
    apply_settings,
    capabilities,
    probe_cases,
    torch_device,
    torchrun_env,
)


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
    timeout_s: float = 0.0  # the launcher's watchdog for one case: written into the host lock while held
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


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (and exit now if it already has)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(70)


def _control(stream: IO[str], peers_lost: dict[str, str], progress: dict[str, int],
             send: Callable[[protocol.Message], None] | None = None) -> None:
    """The launcher's control channel: `PeerLost`, and `ProgressQuery` (how many collective ops
    this rank has entered in its case: a hung rank stops short of its peers); end of file means the
    launcher is gone."""
    with contextlib.suppress(OSError, ValueError):
        for msg in protocol.messages(stream):
            if isinstance(msg, protocol.PeerLost):
                peers_lost[str(msg.rank)] = msg.why
            elif isinstance(msg, protocol.ProgressQuery) and send is not None:
                send(protocol.Progress(ops=progress["ops"]))
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


def run_plan(plan: WorkerPlan, control: IO[str] | None = None) -> int:
    send = protocol.Sender(protocol.open_channel())
    peers_lost = dict(plan.peers_lost)
    progress = {"ops": 0}
    env = torchrun_env()
    info = DeviceInfo.from_dict(plan.device)
    rank = env["rank"]
    if control is not None:
        threading.Thread(target=_control, args=(control, peers_lost, progress, send), daemon=True).start()

    settings = apply_settings(info.kind.value, plan.cpu_threads, plan.cpu_cores)
    settings.update({"world_size": env["world_size"], "local_rank": env["local_rank"]})
    from ..probes import base, faults

    device = torch_device(info)
    send(protocol.Hello(pid=os.getpid(), ranks=[rank], settings=settings))
    fault_list = [f for spec in plan.inject for f in faults.parse(spec)]
    # CPU workers share cores: a whole case runs alone on the host (the lock is host-wide), so
    # no device is timed while a neighbour computes. Collective probes run on all ranks at once.
    lock = HostLock(plan.lock_path, plan.timeout_s) if plan.lock_path else None
    group_failure = "" if plan.collectives_ok else "this rank's worker was lost earlier in the run"
    per_case_s = plan.duration_s / max(1, sum(len(c) for _, c in plan.probes)) if plan.duration_s > 0 else 0.0

    def not_run(c: Case) -> bool:
        if not c.collective:
            return False
        if peers_lost and plan.collectives_ok and str(rank) not in peers_lost:
            # A rank of the group is gone: the group cannot complete, and that is not this chip's doing.
            who = "; ".join(f"peer rank {r} lost ({why})" for r, why in sorted(peers_lost.items()))
            error = ErrorInfo(kind=ErrorKind.PEER_LOST, message=f"not run: {who}"[:600])
        elif group_failure:
            # A failed collective leaves the process group unusable: say so, quickly.
            error = ErrorInfo(kind=ErrorKind.CRASH,
                              message=f"not run: the process group failed earlier ({group_failure})")
        else:
            return False
        send(protocol.Start(probe=c.probe, case=c.case))
        result = loop.stamp(c, rank, base.CaseOutcome(case=c.case, params={}, error=error), time.time())
        lost = error.kind is ErrorKind.PEER_LOST  # (a peer's loss is not this chip's failure)
        send(protocol.Result(result=replace(result, verdict=Verdict.PASS) if lost else result))
        return True

    def wait(c: Case, lock: HostLock) -> None:
        # The launcher times the queue for the lock too: a holder that stalls past its own
        # watchdog (another run's hung worker) makes this case an error naming the lock.
        lock.what = f"run {plan.run_id} rank {rank} {c.probe} {c.case}"
        send(protocol.Wait(probe=c.probe, case=c.case))

    def running(c: Case) -> contextlib.AbstractContextManager[None]:
        # CPU only: a Python dispatch mode costs microseconds per op, which a GPU's timed
        # collectives would feel; there the launcher times out the whole hung group instead.
        if not (c.collective and info.kind.value == "cpu"):
            return contextlib.nullcontext()
        progress["ops"] = 0
        return _op_counter(progress)()

    def keep(c: Case, result: ProbeResult) -> None:
        nonlocal group_failure
        if c.collective and result.error is not None and not group_failure:
            group_failure = f"{c.case}: {result.error.message[:160]}"
        send(protocol.Result(result=result))

    # `start` once the host lock is held: the case's own watchdog times the case alone.
    loop = CaseLoop(run_id=plan.run_id, seed=plan.seed, infos={rank: info}, settings=settings, fault_list=fault_list,
                    keep=keep, skip=not_run, wait=wait, running=running,
                    start=lambda c: send(protocol.Start(probe=c.probe, case=c.case)))
    cases = probe_cases(plan.probes, device=device, info=info, seed=plan.seed, profile=plan.profile, rank=rank,
                        world_size=env["world_size"], group=_lazy_group(info.kind.value, env), lock=lock,
                        fault_list=fault_list, options=plan.options, capabilities=capabilities(info), budget_s=per_case_s)
    stop_faults = faults.start_process_faults(fault_list, rank)
    loop.run(cases)
    stop_faults()
    send(protocol.Bye())
    return 0


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

