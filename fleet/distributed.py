"""The worker as its own launcher's guest: `python -m chipcheck.worker run|links [options]` (its command
line is chipcheck.torchrun).

Under torchrun, srun or a Kubernetes Indexed Job every process is one device: it reads RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, joins the process group (NCCL on GPUs,
gloo on CPU), runs the same probe plan as every other rank, appends each result to a local
JSONL shard the moment it exists (nothing is lost if rank 0 dies), and sends its results to
rank 0, which judges the fleet and writes the store, --json and the report. The exit code of
every rank is the run's: 0 pass, 1 a device or link failed, 2 usage or setup error.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..results import DeviceInfo, DeviceKind, ErrorInfo, ErrorKind, ProbeResult, RunSummary, Verdict
from . import devices as devmod
from .harness import (
    Case,
    CaseLoop,
    HostLock,
    apply_settings,
    error_result,
    host_lock_path,
    probe_cases,
    torch_device,
    torchrun_env,
)
from .session import RunSession
from .supervisor import interrupt_on_signals

if TYPE_CHECKING:
    from .runner import RunOptions


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedOptions:
    command: str
    """`run` or `links`."""
    db_path: str | None = None
    local_dir: str = "chipcheck-shards"
    """Where each rank keeps its own JSONL copy of its results."""
    host: str | None = None
    """Host label (default: $CHIPCHECK_HOSTNAME or the hostname)."""
    show: Callable[[RunSummary], None] | None = None
    """Rank 0, once the run is judged and stored: print it and write --json / --report (the command
    line's, chipcheck.torchrun; the fleet layer renders no documents itself)."""


def _device(spec: str, local_rank: int, local_world: int, host: str) -> DeviceInfo:
    req = devmod.parse_spec(spec)
    use_cuda = (req is None and devmod.gpu_count() > 0) or (req is not None and req.kind is DeviceKind.CUDA)
    if use_cuda:
        index = req.indices[local_rank] if req is not None and req.indices else local_rank
        return devmod.cuda_devices((index,), host)[0]
    d = devmod.cpu_devices(local_world, host)[0]
    return replace(d, index=local_rank, uuid=f"cpu-{host}-{local_rank}")


def run(opts: RunOptions, dopts: DistributedOptions) -> int:
    """One rank's whole life; returns its exit code.

    SIGINT, SIGTERM and SIGHUP (torchrun passes the one it got to every rank) end it with
    KeyboardInterrupt. Rank 0 has the run in the store from the start, its own results kept as
    they come: on the way out it adds what this host's shards hold of the other ranks and the
    run is marked `interrupted` (fleet.session); `chipcheck ingest` adds the other hosts' shards.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupt_on_signals())
        return _rank(opts, dopts, stack)


def _rank(opts: RunOptions, dopts: DistributedOptions, stack: contextlib.ExitStack) -> int:
    import torch.distributed as dist

    from ..probes import base, faults
    from . import runner
    from .judge.speed import RETEST, retest_cases
    from .judge.verdicts import retest_options

    env = torchrun_env()
    rank, world = env["rank"], env["world_size"]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host = dopts.host or os.environ.get("CHIPCHECK_HOSTNAME") or socket.gethostname()
    runner.validate(opts)
    info = _device(opts.devices, env["local_rank"], local_world, host)
    threads = devmod.threads_per_cpu_worker(local_world)
    cores = devmod.cores_for(env["local_rank"], local_world) if info.kind is DeviceKind.CPU else []
    settings = apply_settings(info.kind.value, threads, cores)
    settings.update({"world_size": world, "local_rank": env["local_rank"], "launcher": "distributed"})
    device = torch_device(info)
    timeout = opts.timeout_s or runner.DEFAULT_TIMEOUT_S.get(opts.profile) or 600.0
    # Rendezvous through a TCPStore that outlives the process group: rank 0 learns who joined
    # (and names who did not), and results travel through it even when a collective broke.
    kv = Rendezvous(rank, world, timeout)
    kv.store.set(f"chipcheck/joined/{rank}", json.dumps(info.to_dict()))
    session: RunSession | None = None
    if rank == 0:
        joined = kv.wait_for("joined", time.monotonic() + timeout)
        if len(joined) < world:
            devs_known = {r: DeviceInfo.from_dict(json.loads(v)) for r, v in joined.items()}
            kv.store.set("chipcheck/abort", "1")
            return _never_joined(opts, dopts, devs_known, world, timeout, stack)
        run_id = runner.new_run_id()
        try:  # the store takes the run before any rank starts: a store that cannot calls the run off
            session = _session(opts, dopts, run_id,
                               [DeviceInfo.from_dict(json.loads(joined[r])) for r in range(world)], stack)
        except BaseException:
            kv.store.set("chipcheck/abort", "1")
            raise
        stack.push(_salvage_on_interrupt(session, Path(dopts.local_dir)))
        kv.store.set("chipcheck/go", run_id)
    else:
        go = kv.wait_go(time.monotonic() + 2 * timeout)
        if go is None:
            print(f"chipcheck: rank {rank}: the run was called off (a rank never joined)", file=sys.stderr)
            return 1
        run_id = go
    dist.init_process_group(backend="nccl" if info.kind is DeviceKind.CUDA else "gloo",
                            store=dist.PrefixStore("pg", kv.store), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    group = dist.group.WORLD
    devs = [DeviceInfo.from_dict(json.loads(kv.store.get(f"chipcheck/joined/{r}").decode())) for r in range(world)]
    plan = runner.plan_probes(opts, devs)
    shard = Path(dopts.local_dir) / f"{run_id}-{host}-rank{rank}.jsonl"
    shard.parent.mkdir(parents=True, exist_ok=True)
    fault_list = [f for spec in opts.inject for f in faults.parse(spec)]
    # Host-wide (a file in /tmp): "nodes" of one machine (two torchrun invocations, netns hosts)
    # must not time their CPU devices at once either; on separate machines it costs nothing.
    lock = HostLock(host_lock_path(), timeout) \
        if info.kind is DeviceKind.CPU else None
    caps = devmod.capabilities(info)
    mine: list[ProbeResult] = []

    def write(r: ProbeResult) -> None:
        mine.append(r)
        with shard.open("a") as f:
            f.write(r.to_json() + "\n")

    def keep(_: Case, r: ProbeResult) -> None:
        write(r)
        if session is not None:  # rank 0: in the store the moment it exists
            session.keep(r)

    started = time.time()
    stop_faults = faults.start_process_faults(fault_list, rank)

    @contextlib.contextmanager
    def watch(c: Case, t0: float) -> Iterator[None]:
        def expire() -> None:
            # A hung probe cannot be interrupted in-process: record it, then leave. Rank 0
            # reports this rank from its shard-less silence; this shard keeps the reason.
            err = base.CaseOutcome(case=c.case, params={}, error=ErrorInfo(
                kind=ErrorKind.TIMEOUT, message=f"{c.probe} {c.case} on {host} {info.label} (rank {rank}, "
                                                f"seed {opts.seed}) exceeded its {timeout:g}s watchdog"))
            write(loop.stamp(c, rank, err, t0))  # (the shard only: the store belongs to the main thread)
            os._exit(3)

        dog = threading.Timer(timeout, expire)
        dog.daemon = True
        dog.start()
        yield
        dog.cancel()

    # one watchdog times a case from before it queues for the host lock, and its result is timed alike
    loop = CaseLoop(run_id=run_id, seed=opts.seed, infos={rank: info}, settings=settings, fault_list=fault_list,
                    keep=keep, watch=watch, timed_from_queue=True)

    def run_plan(items: list[tuple[str, list[str]]], options: dict[str, str]) -> None:
        loop.run(probe_cases(items, device=device, info=info, seed=opts.seed, profile=opts.profile, rank=rank,
                             world_size=world, group=lambda: group, lock=lock, fault_list=fault_list,
                             options=options, capabilities=caps))

    run_plan(plan, dict(opts.options))
    kv.store.set(f"chipcheck/results/{rank}", json.dumps([r.to_dict() for r in mine]))
    code = 0
    results: list[ProbeResult] = []
    lost: list[ProbeResult] = []
    if rank == 0:
        parts = kv.wait_for("results", time.monotonic() + timeout)
        results = [ProbeResult.from_dict(d) for v in parts.values() for d in json.loads(v)]
        lost = _missing(results, devs, plan, run_id, opts.seed)
        results += lost
    # speed suspects are retested before they are called slow, in stages (fleet.judge.speed); never
    # with a rank lost: the retest is collective. Rank 0 decides each stage, every rank runs it.
    for stage in range(3):
        if rank == 0:
            retest = {} if lost or stage == 2 else retest_options(results, dict(enumerate(devs)), opts.min_gap)
            kv.store.set(f"chipcheck/retest/{stage}", json.dumps(retest))
        else:
            retest = json.loads(kv.wait_key(f"chipcheck/retest/{stage}", time.monotonic() + 2 * timeout) or "{}")
        if not retest:
            break
        done = len(mine)
        run_plan([(RETEST, retest_cases(retest))], {**opts.options, **retest})
        kv.store.set(f"chipcheck/retested/{stage}/{rank}", json.dumps([r.to_dict() for r in mine[done:]]))
        if rank == 0:
            parts = kv.wait_for(f"retested/{stage}", time.monotonic() + timeout)
            results += [ProbeResult.from_dict(d) for v in parts.values() for d in json.loads(v)]
    stop_faults()
    if session is not None:
        code = _finish(session, opts, dopts, devs, results, started)
        kv.store.set("chipcheck/code", str(code))
    else:
        with contextlib.suppress(Exception):
            code = int(kv.store.get("chipcheck/code").decode())
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return code


class Rendezvous:
    """The job's key-value store (MASTER_ADDR:MASTER_PORT unless given; rank 0 hosts it).

    It outlives the job's process group (torch.distributed, or a JAX job's coordinator): results
    travel through it even when a collective broke, and rank 0 learns who never arrived.
    """

    def __init__(self, rank: int, world: int, timeout: float, addr: str | None = None, port: int | None = None):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        # Under torchrun the agent already hosts the store at MASTER_PORT: every worker is a client.
        agent = addr is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        self.store = dist.TCPStore(addr or os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                   port or int(os.environ.get("MASTER_PORT", "29500")), world,
                                   is_master=rank == 0 and not agent,
                                   timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)

    def wait_for(self, what: str, deadline: float) -> dict[int, str]:
        """Values of chipcheck/<what>/<rank> present by `deadline` (rank 0's own is always there)."""
        got: dict[int, str] = {}
        while True:
            for r in range(self.world):
                if r not in got and self.store.check([f"chipcheck/{what}/{r}"]):
                    got[r] = self.store.get(f"chipcheck/{what}/{r}").decode()
            if len(got) == self.world or time.monotonic() >= deadline:
                return got
            time.sleep(0.2)

    def wait_key(self, key: str, deadline: float) -> str | None:
        """The value of one key once rank 0 has set it (None past `deadline`, or when rank 0's store
        is gone: rank 0 finished, or died, and judges without this rank)."""
        while time.monotonic() < deadline:
            try:
                if self.store.check([key]):
                    return self.store.get(key).decode()
            except (RuntimeError, OSError):  # torch's DistNetworkError is a RuntimeError
                return None
            time.sleep(0.2)
        return None

    def wait_go(self, deadline: float) -> str | None:
        while time.monotonic() < deadline:
            if self.store.check(["chipcheck/abort"]):
                return None
            if self.store.check(["chipcheck/go"]):
                return self.store.get("chipcheck/go").decode()
            time.sleep(0.2)
        return None


def _never_joined(opts: RunOptions, dopts: DistributedOptions, joined: dict[int, DeviceInfo], world: int,
                  timeout: float, stack: contextlib.ExitStack) -> int:
    """Rank 0 when some ranks never arrived: a run that names them, and exit 1."""
    from . import runner

    run_id = runner.new_run_id()
    devs = []
    for r in range(world):
        if r in joined:
            devs.append(joined[r])
        else:
            d0 = joined[0]
            devs.append(replace(d0, index=r, uuid=f"rank-{r}-never-joined", host="?", name="never joined"))
    plan = runner.plan_probes(opts, devs)
    missing = sorted(set(range(world)) - set(joined))
    why = f"rank(s) {missing} never joined within {timeout:g}s"
    session = _session(opts, dopts, run_id, devs, stack)
    for r, d in enumerate(devs):
        for p, cases in plan:
            for c in cases:
                session.keep(error_result(run_id, opts.seed, d, r, p, c, ErrorKind.TIMEOUT,
                                          why if r in missing else f"not run: {why}"))
    _finish(session, opts, dopts, devs, None, time.time())
    return 1


def _missing(results: list[ProbeResult], devs: list[DeviceInfo], plan: list[tuple[str, list[str]]], run_id: str,
             seed: int) -> list[ProbeResult]:
    """An error for every planned case a rank never reported (it died or hung)."""
    have = {(r.rank, r.probe, r.case) for r in results}
    return [error_result(run_id, seed, d, rank, probe, case, ErrorKind.CRASH,
                         f"rank {rank} ({d.label} on {d.host}) never reported {probe} {case}: it died, hung or "
                         f"lost the group; its local shard may hold the reason")
            for rank, d in enumerate(devs) for probe, cases in plan for case in cases
            if (rank, probe, case) not in have]


def _session(opts: RunOptions, dopts: DistributedOptions, run_id: str, devs: list[DeviceInfo],
             stack: contextlib.ExitStack) -> RunSession:
    """Rank 0: the run in the store (open until `stack` closes), begun with its devices and its plan
    (an interrupted run lists what it did not reach)."""
    from . import runner
    from .store import Store, default_path

    plan = runner.plan_probes(opts, devs)  # before the store: a bad plan is a usage error, nothing written
    store = Store(dopts.db_path or default_path())
    stack.callback(store.close)
    session = stack.enter_context(RunSession(store, run_id))
    session.begin(host=devs[0].host, profile=opts.profile, seed=opts.seed, argv=list(sys.argv),
                  config={"devices": opts.devices, "probes": list(opts.probes), "inject": list(opts.inject),
                          "launcher": "distributed", "world_size": len(devs), "options": dict(opts.options),
                          "pid": os.getpid(), "plan": plan})
    session.add_devices(devs)
    return session


def _salvage_on_interrupt(session: RunSession, local_dir: Path) -> Callable[..., None]:
    """Rank 0's way out of an interrupted run (an ExitStack exit callback, before the session marks
    the run `interrupted`): keep what the other ranks' shards on this host (or in a shared folder)
    hold of this run, so it holds every result measured here before the signal. A shard's last
    line may be half-written: it is skipped."""
    from .ingest import ShardUnreadable, read_shard

    def salvage(kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if not isinstance(exc, KeyboardInterrupt):
            return
        for path in sorted(local_dir.glob(f"{session.run_id}-*.jsonl")):
            with contextlib.suppress(ShardUnreadable):
                for r in read_shard(path)[0]:
                    if r.run_id == session.run_id:
                        session.keep_new(r)

    return salvage


def _finish(session: RunSession, opts: RunOptions, dopts: DistributedOptions, devs: list[DeviceInfo],
            results: list[ProbeResult] | None, started: float) -> int:
    """Rank 0: keep the other ranks' results, judge `results` (default: those kept), end the run, then
    `dopts.show` the summary. Returns the run's exit code."""
    from . import runner

    if results is not None:  # rank 0's own were kept as they came
        for r in results:
            if r.rank != 0:
                session.keep(r)
    summary = session.finish(lambda rs: runner.judge(session.run_id, dict(enumerate(devs)), rs, opts, started),
                             results)
    if dopts.show is not None:
        dopts.show(summary)
    return 0 if summary.verdict is Verdict.PASS else 1
