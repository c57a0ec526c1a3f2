"""The local launcher: one real worker process per device, a watchdog per probe case.

Results are handed to `on_result` (which writes them to the store) the moment a worker sends
them. A case that outlives its timeout has its worker killed and is recorded as `error`
(timeout); a worker that dies is recorded as `error` (crash) with its exit status and the end
of its log. The rest of that probe's cases on that device are recorded as not run, later
probes get a fresh worker, and every other device carries on.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results import DeviceInfo, DeviceKind, ErrorKind, ProbeResult
from . import devices as devmod
from .worker import WorkerPlan, error_result

STARTUP_TIMEOUT_S = 180.0  # importing torch and initialising a device on a loaded host


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchRequest:
    run_id: str
    devices: list[DeviceInfo]
    probes: list[tuple[str, list[str]]]
    profile: str
    seed: int
    timeout_s: float
    inject: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    options: dict[str, str] = field(default_factory=dict)
    master_port: int = 0  # 0: a free port on this host


@dataclass
class _Worker:
    rank: int
    info: DeviceInfo
    todo: list[tuple[str, str]]  # (probe, case) not yet reported
    proc: subprocess.Popen[bytes] | None = None
    current: tuple[str, str] | None = None
    since: float = 0.0
    hello: bool = False
    killed_for: ErrorKind | None = None
    log_path: str = ""
    done: bool = False
    restarted: bool = False


def _error_result(req: LaunchRequest, w: _Worker, probe: str, case: str, kind: ErrorKind, msg: str) -> ProbeResult:
    return error_result(req.run_id, req.seed, w.info, w.rank, probe, case, kind, msg)


def log_tail(path: str | Path, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(t.strip() for t in text[-lines:])


def run_local(req: LaunchRequest, on_result: Callable[[ProbeResult], None],
              on_start: Callable[[int, str, str], None] | None = None) -> None:
    """Run every planned case on every device; returns when each case has a result."""
    workdir = tempfile.mkdtemp(prefix=f"chipcheck-{req.run_id}-")
    # Host-wide, not per run: two runs on one host must not time their CPU devices at once either.
    lock_path = os.path.join(tempfile.gettempdir(), f"chipcheck-{os.getuid()}-cpu-timing.lock")
    n_cpu = sum(1 for d in req.devices if d.kind is DeviceKind.CPU)
    workers = [
        _Worker(rank=r, info=d, todo=[(p, c) for p, cases in req.probes for c in cases])
        for r, d in enumerate(req.devices)
    ]
    q: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
    master_port = req.master_port or free_port()
    dead: list[tuple[int, str, str]] = []  # ranks lost inside a collective probe: (rank, probe, case)

    def start(w: _Worker) -> None:
        remaining: list[tuple[str, list[str]]] = []
        for p, c in w.todo:
            if remaining and remaining[-1][0] == p:
                remaining[-1][1].append(c)
            else:
                remaining.append((p, [c]))
        plan = WorkerPlan(
            run_id=req.run_id, device=w.info.to_dict(), probes=remaining, profile=req.profile, seed=req.seed,
            inject=req.inject, duration_s=req.duration_s, options=dict(req.options),
            cpu_cores=devmod.cores_for(w.rank, n_cpu) if w.info.kind is DeviceKind.CPU else [],
            cpu_threads=devmod.threads_per_cpu_worker(n_cpu) if n_cpu else 1,
            lock_path=lock_path if w.info.kind is DeviceKind.CPU else "",
            collectives_ok=not w.restarted and not dead,
        )
        plan_path = os.path.join(workdir, f"plan-{w.rank}.json")
        Path(plan_path).write_text(plan.to_json())
        w.log_path = os.path.join(workdir, f"worker-{w.rank}.log")
        env = {**os.environ, "RANK": str(w.rank), "LOCAL_RANK": str(w.rank), "WORLD_SIZE": str(len(workers)),
               "LOCAL_WORLD_SIZE": str(len(workers)), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(master_port), "OMP_NUM_THREADS": str(plan.cpu_threads)}
        env.pop("CHIPCHECK_RESULT_FD", None)
        with open(w.log_path, "ab") as log:
            w.proc = subprocess.Popen([sys.executable, "-m", "chipcheck.worker", "--plan", plan_path],
                                      stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True)
        w.current, w.since, w.hello, w.killed_for = None, time.monotonic(), False, None
        threading.Thread(target=read_messages, args=(w.rank, w.proc, q), daemon=True).start()

    def kill(w: _Worker, why: ErrorKind) -> None:
        w.killed_for = why
        if w.proc:
            kill_group(w.proc)

    def lost(w: _Worker) -> None:
        """The worker is gone: record the case it was in and what it did not reach, then go on."""
        assert w.proc is not None
        code = w.proc.wait()
        if not w.todo:
            w.done = True
            return
        probe, case = w.current or w.todo[0]
        if w.killed_for is ErrorKind.TIMEOUT:
            kind, msg = ErrorKind.TIMEOUT, (f"{probe} {case} on {w.info.host} {w.info.label} (rank {w.rank}, seed "
                                            f"{req.seed}) exceeded its {req.timeout_s:g}s watchdog; worker killed")
        elif not w.hello and w.killed_for is None:
            kind, msg = ErrorKind.CRASH, (f"worker for {w.info.label} on {w.info.host} died at start-up "
                                          f"(exit {code}): {log_tail(w.log_path)}")
        else:
            kind, msg = ErrorKind.CRASH, (f"worker for {w.info.label} on {w.info.host} died in {probe} {case} "
                                          f"(rank {w.rank}, seed {req.seed}): {exit_text(code)}. "
                                          f"{log_tail(w.log_path)}")
        on_result(_error_result(req, w, probe, case, kind, msg))
        w.todo.remove((probe, case))
        if _is_collective(probe):
            dead.append((w.rank, probe, case))
        for p, c in [t for t in w.todo if t[0] == probe]:
            on_result(_error_result(req, w, p, c, ErrorKind.CRASH,
                                    f"not run: the worker was lost in {probe} {case}"))
            w.todo.remove((p, c))
        if w.todo:
            w.restarted = True
            start(w)  # later probes get a fresh worker (collective ones cannot rejoin the group)
        else:
            w.done = True

    try:
        for w in workers:
            start(w)
        while not all(w.done for w in workers):
            try:
                rank, msg = q.get(timeout=0.2)
            except queue.Empty:
                rank, msg = -1, None
            if rank >= 0:
                w = workers[rank]
                if msg is None:
                    lost(w)
                elif msg["t"] == "hello":
                    w.hello, w.since = True, time.monotonic()
                elif msg["t"] == "start":
                    w.current, w.since = (msg["probe"], msg["case"]), time.monotonic()
                    if on_start:
                        on_start(rank, msg["probe"], msg["case"])
                elif msg["t"] == "result":
                    res = _name_the_lost(ProbeResult.from_dict(msg["result"]), dead, workers)
                    with contextlib.suppress(ValueError):
                        w.todo.remove((res.probe, res.case))
                    w.current = None
                    on_result(res)
            now = time.monotonic()
            for w in workers:
                if w.done or w.killed_for is not None:
                    continue
                if not w.hello and now - w.since > max(STARTUP_TIMEOUT_S, req.timeout_s):
                    kill(w, ErrorKind.TIMEOUT)
                elif w.current is not None and now - w.since > req.timeout_s:
                    kill(w, ErrorKind.TIMEOUT)
    finally:
        for w in workers:
            if w.proc:
                kill_group(w.proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child started with start_new_session, and whatever it started, if still running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def exit_text(code: int) -> str:
    """A child's return code as people read it: "signal 9" or "exit 1"."""
    return f"signal {-code}" if code < 0 else f"exit {code}"


def _is_collective(probe: str) -> bool:
    from ..probes import base

    cls = base.registry().get(probe)
    return bool(cls and cls.collective)


def _name_the_lost(res: ProbeResult, dead: list[tuple[int, str, str]], workers: list[_Worker]) -> ProbeResult:
    """A collective that failed because a peer died says which rank it was."""
    if res.error is None or not _is_collective(res.probe):
        return res
    import dataclasses

    # A peer's death can reach us after the error it caused: also name workers already exited.
    named = {r for r, _, _ in dead}
    gone: list[tuple[int, str, str]] = []
    for _ in range(10):  # a killed peer's sockets close while it exits: give its exit a moment to land
        gone = [(w.rank, "", "") for w in workers if w.rank != res.rank and w.rank not in named
                and w.proc is not None and w.proc.poll() not in (None, 0)]
        if dead or gone:
            break
        time.sleep(0.05)
    if not dead and not gone:
        return res
    who = ", ".join(f"rank {r} ({workers[r].info.label} on {workers[r].info.host}"
                    + (f", lost in {p} {c})" if p else ", exited)") for r, p, c in [*dead, *gone])
    err = dataclasses.replace(res.error, message=f"peer lost: {who}; {res.error.message}"[:600])
    return dataclasses.replace(res, error=err)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_messages(rank: int, proc: subprocess.Popen[bytes], q: queue.Queue[tuple[int, dict[str, Any] | None]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            q.put((rank, json.loads(line)))
        except json.JSONDecodeError:
            continue  # not ours: the protocol lines are the only JSON objects on this pipe
    q.put((rank, None))
