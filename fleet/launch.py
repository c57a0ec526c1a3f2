"""The local launcher: one real worker process per device, a watchdog per probe case.

Results are handed to `on_result` (which writes them to the store) the moment a worker sends
them. A case that outlives its timeout has its worker killed and is recorded as `error`
(timeout); a worker that dies is recorded as `error` (crash) with its exit status and the end
of its log. The rest of that probe's cases on that device are recorded as not run; after a crash
later probes get one fresh worker (a hung rank, or one lost twice, is not run again), and every
other device carries on.

A lost rank is evidence against that rank only. The other workers are told at once (`peer_lost`
on their control channel): their collective cases are recorded as not run (`peer_lost`, verdict
pass: never held against them), a worker caught inside a collective with the lost rank is
stopped and restarted for its later probes instead of waiting for the process group's timeout,
so the run ends within about one watchdog period of the loss.

No process outlives its run: workers are started in their own process group, die with the
launcher (parent-death signal, end of file on their control channel), and are killed on the way
out whatever ends the run (SIGINT/SIGTERM become `RunInterrupted`, see `supervisor.interrupt_on_signals`).
Nothing is written to disk: plans travel on the workers' stdin, logs live in unlinked files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from ..probes import faults
from ..probes.base import is_collective
from ..results import DeviceInfo, DeviceKind, ErrorInfo, ErrorKind, ProbeResult, Verdict
from . import devices as devmod
from . import protocol
from .harness import error_result, host_lock_path, lock_holder
from .supervisor import Phase, Watch, child_env, exit_text, kill_group, lost_in, not_run, spawn, tail_of
from .worker import WorkerPlan

LOCK_GRACE_S = 5.0  # a lock holder of this run is killed by its own watchdog first
MAX_LOSSES = 2  # a rank lost this often in one run is not started again


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
    epoch: float = 0.0
    """When the run began (time.time()); faults' `after_s` counts from it (0: from each launch)."""


@dataclass
class _Worker:
    rank: int
    info: DeviceInfo
    todo: list[tuple[str, str]]  # (probe, case) not yet reported
    watch: Watch
    proc: subprocess.Popen[bytes] | None = None
    killed_for: ErrorKind | None = None
    kill_note: str = ""
    log: IO[bytes] | None = None  # an unlinked file: the worker's stderr
    done: bool = False
    losses: int = 0  # times this rank was lost (crash, hang)
    ops: int | None = None  # collective ops entered in its case, as it last said (`progress`)
    polled: float = 0.0  # when it was asked for its progress (0: not asked)
    lock_said: float = 0.0  # when the host lock's holder last said who it is, seen while this one waited

    @property
    def where(self) -> str:
        return f"{self.info.label} on {self.info.host}"


def _error_result(req: LaunchRequest, w: _Worker, probe: str, case: str, kind: ErrorKind, msg: str) -> ProbeResult:
    return error_result(req.run_id, req.seed, w.info, w.rank, probe, case, kind, msg)


def _peer_lost_result(req: LaunchRequest, w: _Worker, probe: str, case: str, msg: str) -> ProbeResult:
    """A case this rank could not run because another rank was lost: recorded, never held against it."""
    r = _error_result(req, w, probe, case, ErrorKind.PEER_LOST, msg[:600])
    return dataclasses.replace(r, verdict=Verdict.PASS)


def run_local(req: LaunchRequest, on_result: Callable[[ProbeResult], None],
              on_start: Callable[[int, str, str], None] | None = None) -> None:
    """Run every planned case on every device; returns when each case has a result."""
    # Host-wide, not per run: two runs on one host must not time their CPU devices at once either.
    lock_path = host_lock_path()
    n_cpu = sum(1 for d in req.devices if d.kind is DeviceKind.CPU)
    workers = [
        _Worker(rank=r, info=d, todo=[(p, c) for p, cases in req.probes for c in cases], watch=Watch(req.timeout_s))
        for r, d in enumerate(req.devices)
    ]
    q: queue.Queue[tuple[int, Any, protocol.Message | None]] = queue.Queue()
    store = None if req.master_port else agent_store()  # held to the end of the run: it is the rendezvous
    master_port = int(store.port) if store is not None else req.master_port
    launched = time.time()
    lost_ranks: dict[int, str] = {}  # rank -> what happened to it (said to every other worker)

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
            lock_path=lock_path if w.info.kind is DeviceKind.CPU else "", timeout_s=req.timeout_s,
            collectives_ok=w.losses == 0,
            peers_lost={str(r): why for r, why in lost_ranks.items() if r != w.rank},
        )
        env = child_env({"RANK": str(w.rank), "LOCAL_RANK": str(w.rank), "WORLD_SIZE": str(len(workers)),
                         "LOCAL_WORLD_SIZE": str(len(workers)), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(master_port), "OMP_NUM_THREADS": str(plan.cpu_threads),
                         "CHIPCHECK_PARENT_PID": str(os.getpid()), faults.EPOCH_ENV: repr(req.epoch or launched),
                         **({"TORCHELASTIC_USE_AGENT_STORE": "True"} if store is not None else {})})
        if w.log is None:
            w.log = tempfile.TemporaryFile(prefix=f"chipcheck-{req.run_id}-rank{w.rank}-")
        w.watch, w.killed_for, w.kill_note, w.ops, w.polled = Watch(req.timeout_s), None, "", None, 0.0
        rank = w.rank

        def on_message(proc: Any, msg: protocol.Message | None) -> None:
            q.put((rank, proc, msg))

        w.proc = spawn([sys.executable, "-m", "chipcheck.worker", "--plan", "-"], env=env, log=w.log,
                       on_message=on_message)
        _tell(w, plan)

    def kill(w: _Worker, why: ErrorKind, note: str = "") -> None:
        w.killed_for, w.kill_note = why, note
        if w.proc:
            kill_group(w.proc)

    def lose(w: _Worker, what: str) -> None:
        """Rank `w` is gone for the group: every other worker hears it now, not at the group's timeout."""
        lost_ranks[w.rank] = what
        for o in workers:
            if o is not w and not o.done and o.proc is not None and o.proc.poll() is None:
                _tell(o, protocol.PeerLost(rank=w.rank, why=what))

    def peers_text(rank: int) -> str:
        return "; ".join(f"peer rank {r} lost ({why})" for r, why in sorted(lost_ranks.items()) if r != rank)

    def finish_or_restart(w: _Worker, restart: bool, why: str, kind: ErrorKind) -> None:
        if w.todo and restart:
            start(w)  # later probes get a fresh worker (collective ones cannot rejoin the group)
            return
        for p, c in list(w.todo):
            for r in not_run(req.run_id, req.seed, w.info, w.rank, p, [c], kind, why):
                on_result(r)
        w.todo.clear()
        w.done = True

    def lost(w: _Worker, proc: Any) -> None:
        """The worker is gone: record the case it was in and what it did not reach, then go on."""
        if proc is not w.proc:
            return  # an earlier worker of this rank, already accounted for
        assert w.proc is not None
        code = w.proc.wait()
        if not w.todo:
            w.done = True
            return
        probe, case = w.watch.case or w.todo[0]
        if w.killed_for is ErrorKind.PEER_LOST:
            # stopped by us inside a collective whose group lost a rank: not this rank's doing
            why = f"not run: {peers_text(w.rank)}"
            for p, c in [t for t in w.todo if t[0] == probe and is_collective(probe)]:
                on_result(_peer_lost_result(req, w, p, c, why))
                w.todo.remove((p, c))
            finish_or_restart(w, True, why, ErrorKind.CRASH)
            return
        if w.killed_for is ErrorKind.TIMEOUT:
            kind, msg = ErrorKind.TIMEOUT, w.kill_note or (
                f"{probe} {case} on {w.info.host} {w.info.label} (rank {w.rank}, seed {req.seed}) exceeded its "
                f"{req.timeout_s:g}s watchdog; worker killed")
        elif not w.watch.hello and w.killed_for is None:
            kind, msg = ErrorKind.CRASH, (f"worker for {w.info.label} on {w.info.host} died at start-up "
                                          f"({exit_text(code)}): {tail_of(w.log.fileno()) if w.log else ''}")
        else:
            kind, msg = ErrorKind.CRASH, (f"worker for {w.info.label} on {w.info.host} died in {probe} {case} "
                                          f"(rank {w.rank}, seed {req.seed}): {exit_text(code)}. "
                                          f"{tail_of(w.log.fileno()) if w.log else ''}")
        rest = [c for p, c in w.todo if p == probe and c != case]
        for r in lost_in(req.run_id, req.seed, w.info, w.rank, probe, case, kind, msg, rest, "the worker"):
            on_result(r)
        w.todo = [t for t in w.todo if t[0] != probe]
        w.losses += 1
        what = f"{w.where}: {'hung' if kind is ErrorKind.TIMEOUT else 'crashed'} in {probe} {case}"
        lose(w, what)
        # A hung chip hangs again, and a rank lost twice would only spend the run's time: stop there.
        restart = kind is ErrorKind.CRASH and w.losses < MAX_LOSSES
        finish_or_restart(w, restart, f"rank {w.rank} ({what}) was lost; not started again", kind)

    def collective_timeout(w: _Worker, now: float) -> None:
        """A collective case past its watchdog: every rank in it waits, so ask each how far it got
        (`progress?`) and time out the ranks that stopped short of their peers; when none can be told
        apart, the whole group is timed out, saying so."""
        current = w.watch.current
        assert current is not None
        if any(o.killed_for is not None and o.watch.current == current for o in workers):
            return  # a rank of this case is being ended: its loss decides for the others (peer_lost)
        group = [o for o in workers if o.watch.current == current and o.killed_for is None and o.proc is not None]
        absent = [o for o in workers if o.watch.current != current and not o.done and current in o.todo]
        if absent:
            # A member is still in an earlier case (or waiting for the host lock): the group waits for
            # it, not in a hang of its own. Its own watchdog decides about it (a hang there makes it a
            # lost peer); the group's clock starts once every member is in the collective.
            for o in group:
                o.watch.since, o.polled = now, 0.0
            return
        if not w.polled:
            for o in group:
                o.ops, o.polled = None, now
                _tell(o, protocol.ProgressQuery())
            return
        if now - w.polled < 2.0 and any(o.ops is None for o in group):
            return  # give them a moment to answer
        said = {o.rank: o.ops for o in group if o.ops is not None}
        probe, case = current
        base = (f"{probe} {case} on {{host}} {{label}} (rank {{rank}}, seed {req.seed}) exceeded its "
                f"{req.timeout_s:g}s watchdog")
        if len(group) > 1 and said and len(set(said.values())) > 1:
            low, high = min(said.values()), max(said.values())
            hung = [o for o in group if said.get(o.rank, low) == low]
            note = f"; it stopped at collective op #{low} while its peers reached #{high}; worker killed"
        else:
            hung = group
            note = ("; the whole group waited in it, and no rank could be told from the others"
                    f"{f' (each at collective op #{next(iter(said.values()))})' if said else ''}; worker killed")
        for o in hung:
            kill(o, ErrorKind.TIMEOUT, base.format(host=o.info.host, label=o.info.label, rank=o.rank) + note)

    def lock_stalled(w: _Worker, now: float) -> str:
        """Why `w`'s wait for the host lock, past its watchdog, is over (its holder stalled too), or ''."""
        holder = lock_holder(lock_path)
        ours = {o.proc.pid for o in workers if o.proc is not None and o.proc.poll() is None}
        if holder is not None and holder["pid"] in ours:
            return ""  # held by a worker of this run: its own watchdog ends a stall
        if holder is not None:
            w.lock_said = now
        # unsaid: between holders (one truncated its note, the next has not written its own yet), or a
        # holder that never says; timed from the last holder seen saying, not from the start of the wait
        held = time.time() - float(holder["since"]) if holder else now - max(w.watch.since, w.lock_said)
        until = holder.get("until") if holder else None
        # another run's case may hold it as long as that run's own watchdog allows (it ends a hang there)
        theirs = float(until) - float(holder["since"]) if holder and isinstance(until, int | float) else 0.0
        if held <= max(req.timeout_s, theirs) + LOCK_GRACE_S:
            return ""  # the lock changes hands: another run is progressing
        who = (f"held for {held:.0f}s by pid {holder['pid']} ({holder.get('what') or 'unknown'})" if holder
               else "its holder did not say who it is")
        if theirs:
            who += f", past its own {theirs:g}s watchdog"
        probe, case = w.watch.case or ("", "")
        return (f"{probe} {case} on {w.info.host} {w.info.label} (rank {w.rank}, seed {req.seed}) waited "
                f"{now - w.watch.since:.0f}s, past its {req.timeout_s:g}s watchdog, for the host CPU timing lock "
                f"{lock_path}, {who}; worker killed")

    try:
        for w in workers:
            start(w)
        while not all(w.done for w in workers):
            try:
                rank, proc, msg = q.get(timeout=0.2)
            except queue.Empty:
                rank, proc, msg = -1, None, None
            if rank >= 0:
                w = workers[rank]
                if msg is None:
                    lost(w, proc)
                elif proc is not w.proc:
                    pass  # a message from a worker already replaced
                elif isinstance(msg, protocol.Progress):
                    w.ops = msg.ops
                elif isinstance(msg, protocol.Result):
                    res = _blame_the_lost(msg.result, lost_ranks, workers)
                    with contextlib.suppress(ValueError):
                        w.todo.remove((res.probe, res.case))
                    w.watch.to(Phase.IDLE)
                    on_result(res)
                else:
                    w.watch.on(msg)
                    if isinstance(msg, protocol.Start) and on_start:
                        on_start(rank, msg.probe, msg.case)
            now = time.monotonic()
            for w in workers:
                if w.done or w.killed_for is not None or w.proc is None:
                    continue
                current = w.watch.current
                if current is not None and is_collective(current[0]) and any(r != w.rank for r in lost_ranks):
                    kill(w, ErrorKind.PEER_LOST)  # blocked on a rank that is gone: stop waiting now
                elif not w.watch.overdue(now):
                    continue
                elif current is not None and is_collective(current[0]):
                    collective_timeout(w, now)
                elif w.watch.phase is not Phase.WAITING:
                    kill(w, ErrorKind.TIMEOUT)  # a hang in its case, or at start-up
                elif why := lock_stalled(w, now):
                    kill(w, ErrorKind.TIMEOUT, why)
    finally:
        for w in workers:
            if w.proc:
                kill_group(w.proc)
                for pipe in (w.proc.stdin, w.proc.stdout):
                    with contextlib.suppress(OSError):
                        if pipe:
                            pipe.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=5)
            if w.log:
                w.log.close()


def _tell(w: _Worker, msg: protocol.Message | WorkerPlan) -> None:
    """One line on the worker's control channel (its stdin); a worker that is gone is not told."""
    if w.proc is None or w.proc.stdin is None:
        return
    line = msg.to_json() if isinstance(msg, WorkerPlan) else protocol.encode(msg)
    with contextlib.suppress(OSError, ValueError):
        w.proc.stdin.write(line.encode() + b"\n")
        w.proc.stdin.flush()


def _blame_the_lost(res: ProbeResult, lost_ranks: dict[int, str], workers: list[_Worker]) -> ProbeResult:
    """A collective that failed because a peer was lost is not run here, and says which rank it was:
    evidence against that rank, not this one (`peer_lost`, verdict pass)."""
    if res.error is None or res.verdict is not Verdict.ERROR or not is_collective(res.probe) \
            or res.error.kind is ErrorKind.PEER_LOST:
        return res
    who = {r: why for r, why in lost_ranks.items() if r != res.rank}
    for _ in range(10):  # a killed peer's sockets close while it exits: give its exit a moment to land
        if who:
            break
        who = {w.rank: f"{w.where}: exited" for w in workers if w.rank != res.rank
               and w.proc is not None and w.proc.poll() not in (None, 0)}
        if not who:
            time.sleep(0.05)
    if not who:
        return res
    text = "; ".join(f"peer rank {r} lost ({why})" for r, why in sorted(who.items()))
    err = ErrorInfo(kind=ErrorKind.PEER_LOST, message=f"not run: {text}; here: {res.error.message}"[:600])
    return dataclasses.replace(res, verdict=Verdict.PASS, error=err)


def agent_store() -> Any:
    """The run's rendezvous store, hosted by the launcher as torchrun's agent hosts it (every worker a
    client: TORCHELASTIC_USE_AGENT_STORE), on a port the OS picks and this process holds from the
    start. A free port found, closed and handed to rank 0 to bind later could be taken in between on
    a busy host: rank 0 then failed its rendezvous (EADDRINUSE) and a healthy device was `error`."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
