"""`chipcheck run --backend jax`: the probes through JAX/XLA on every device of this host.

JAX's model is one process per host driving all of its devices (TPU chips/cores, GPUs, or forced
host CPU devices), so there are no per-device workers. Two processes instead:

- the *host process* (`host_run`, started as `python -m chipcheck.fleet.jax_runner --plan F`)
  imports JAX, discovers the devices and runs the matmul and attention cases on each device in
  turn and each collectives case once over all of them (one SPMD program). It streams the
  worker protocol (fleet/worker.py): `hello` with the devices, `start` before each case with the
  ranks it occupies, `result` per rank (stamped as the torch workers stamp theirs), `bye`.
- the *supervisor* (`execute`, in the chipcheck process; it never imports JAX) stores each result
  as it arrives and keeps the watchdog: a case that outlives --timeout is killed with the whole
  host process (a hung XLA call cannot be interrupted from inside), recorded as a timeout on the
  ranks it occupied, and a fresh host process carries on with what was not reported yet. A host
  process that dies (a crash, a device lost) is recorded the same way, with its signal. As on the
  torch path, the rest of that probe on those ranks is recorded as not run and later probes get
  the fresh process. On a single host the speed suspects are then retested as on the torch path
  (`retest`: another host process runs probes/jax_retest.py's interleaved GEMM turns); a multi-host
  job (jax.distributed, fleet/jax_multihost.py) is not, and its suspects stay notes. Then the same
  fleet analysis (runner.judge) and RunSummary as the torch path.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..probes import base
from ..probes.faults.spec import EPOCH_ENV
from ..results import DeviceInfo, ErrorKind, ProbeResult, RunSummary
from . import protocol, supervisor
from .harness import Case, CaseLoop, error_result
from .runner import DEFAULT_TIMEOUT_S, RunOptions, UsageError, judge, new_run_id, retest_stages, validate
from .session import RunSession
from .store import Store
from .supervisor import Phase, Watch, child_env, exit_text, kill_group, log_tail, lost_in, not_run, spawn


def jax_probes() -> list[str]:
    """The probes the JAX path runs: every registered probe that names its JAX module."""
    return [n for n, cls in base.registry().items() if cls.jax]


def _entry(probe: str) -> Any:
    """The probe's JAX module (probes/<Probe.jax>.py)."""
    import importlib

    return importlib.import_module(f"{base.__package__}.{base.registry()[probe].jax}")


Task = tuple[str, str, int]  # (probe, case, rank)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPlan:
    """What one host process runs. Written by the supervisor, read by the host process."""

    run_id: str
    profile: str
    seed: int
    probes: list[str] = field(default_factory=list)  # empty: every JAX probe the devices allow
    inject: list[str] = field(default_factory=list)
    done: list[Task] = field(default_factory=list)  # already reported: skipped by a restarted host process
    multihost: dict[str, Any] | None = None  # jax_multihost.MultiHost's fields: join that job first
    cases: dict[str, list[str]] = field(default_factory=dict)  # a probe's cases where the run, not its config, names them
    options: dict[str, str] = field(default_factory=dict)  # the probes' options (the retest's pairs)
    epoch: float = 0.0  # when the run began (time.time()): a fault's `after_s` counts from it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HostPlan:
        d = json.loads(text)
        d["done"] = [tuple(t) for t in d["done"]]
        return cls(**d)


class _Call:
    """Adapts a closure to a probe's interface, so the JAX path shares the harness's case loop and broad catch."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn

    def run_case(self, ctx: Any, cfg: Any, case: str) -> Any:
        return self.fn()


def validate_jax(opts: RunOptions) -> None:
    """What the JAX path cannot do, refused before anything runs (exit 2)."""
    validate(opts)
    if opts.devices != "auto":
        raise UsageError(f"--backend jax runs on every device JAX sees on this host; drop --devices {opts.devices} "
                         "(choose devices with JAX_PLATFORMS / CUDA_VISIBLE_DEVICES / XLA_FLAGS)")
    unknown = [p for p in opts.probes if p not in jax_probes()]
    if unknown:
        raise UsageError(f"probe {unknown[0]!r} is not on the JAX path yet; --backend jax runs: "
                         f"{', '.join(jax_probes())}")
    if opts.profile == "burnin":
        raise UsageError("--profile burnin is not on the JAX path yet; use quick, standard or nightly")


# ---- the supervisor ---------------------------------------------------------------------------


def execute(opts: RunOptions, store: Store, *, on_result: Callable[[ProbeResult], None] | None = None,
            multihost: Any = None) -> RunSummary:
    """Run the JAX probes on this host's JAX devices; every result is in `store` the moment it exists.

    `multihost` (a jax_multihost.MultiHost of more than one process): this host is one process of
    a multi-host job; every process's supervisor runs this, and each ends with the whole job's
    results (exchanged through a key-value store at the coordinator's port + 1), judged alike.
    """
    validate_jax(opts)
    timeout = opts.timeout_s or DEFAULT_TIMEOUT_S[opts.profile]
    job = _Job.join(multihost, timeout) if multihost is not None and multihost.num_processes > 1 else None
    run_id = job.run_id if job else new_run_id()
    started = time.time()
    plan = HostPlan(run_id=run_id, profile=opts.profile, seed=opts.seed, probes=list(opts.probes),
                    inject=list(opts.inject), multihost=asdict(multihost) if job else None, epoch=started)
    # SIGINT/SIGTERM/SIGHUP: the host process is killed (_one_process), what was measured is stored,
    # and the session marks the run `interrupted` before the exception goes on.
    with RunSession(store, run_id, on_result=on_result) as run:
        run.begin(host=socket.gethostname(), profile=opts.profile, seed=opts.seed, argv=opts.argv or sys.argv,
                  config={"devices": opts.devices, "probes": list(opts.probes), "inject": list(opts.inject),
                          "backend": "jax", "timeout_s": timeout, "min_gap": opts.min_gap, "pid": os.getpid(),
                          **({"multihost": multihost.label} if job else {})})
        sup = _Supervisor(plan, timeout, run.keep, run.add_devices, job)
        devs = sup.run()
        if job:
            for r in job.exchange(run.results, sup, timeout):
                run.keep(r)
        else:
            retest(plan, devs, run.results, opts.min_gap, timeout, run.keep)
        summary = run.finish(lambda results: judge(run_id, dict(enumerate(devs)), results, opts, started))
    return summary


def retest(plan: HostPlan, devs: list[DeviceInfo], results: list[ProbeResult], min_gap: float, timeout_s: float,
           keep: Callable[[ProbeResult], None]) -> None:
    """The torch path's retest stages (runner.retest) on a single host's JAX devices: every GEMM speed
    suspect against a peer, interleaved (probes/jax_retest.py), then with more rounds where that was
    inconclusive. A multi-host job is not retested: its suspects stay notes."""
    from .judge import speed

    def stage(options: dict[str, str]) -> None:
        cases = [c for c in speed.retest_cases(options) if c.startswith("gemm")]
        if cases:  # none: nothing comes back, and the stages end
            _Supervisor(replace(plan, probes=[speed.RETEST], cases={speed.RETEST: cases}, options=options, done=[]),
                        timeout_s, keep, lambda _devs: None).run()

    retest_stages(results, dict(enumerate(devs)), min_gap, stage)


class _Supervisor:
    """Starts host processes until every case has a result; the watchdog of each case."""

    def __init__(self, plan: HostPlan, timeout_s: float, keep: Callable[[ProbeResult], None],
                 on_devices: Callable[[list[DeviceInfo]], None], job: _Job | None = None):
        self.plan, self.timeout_s, self.keep, self.on_devices, self.job = plan, timeout_s, keep, on_devices, job
        self.peer_lost = ""  # multi-host: another process's loss, which ended this host's wait for it
        self.devs: list[DeviceInfo] = []
        self.local: list[int] = []  # the ranks this host drives (all of them on a single host)
        self.lost_reason = "this host's JAX process was lost earlier in the job"
        self.done: set[Task] = set()
        self.planned: list[Task] = []  # every (probe, case, rank) of the run, once the devices are known
        self.workdir = tempfile.mkdtemp(prefix=f"chipcheck-{plan.run_id}-jax-")
        self.starts = 0

    def run(self) -> list[DeviceInfo]:
        try:
            while True:
                self.starts += 1
                finished = self._one_process()
                if finished:
                    return self.devs
                if self.plan.multihost:
                    # the job's other processes lost their peer with this one: no fresh job to rejoin
                    if self.job and not self.peer_lost:
                        self.job.mark_lost(self.lost_reason)
                    self._abandon()
                    return self.devs
        finally:  # plans and host logs: whatever ends the run (an interrupt too), nothing is left in /tmp
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _one_process(self) -> bool:
        """One host process, to its end; True when it said bye (everything reported)."""
        plan = HostPlan(**{**asdict(self.plan), "done": sorted(self.done)})
        plan_path = Path(self.workdir) / f"plan-{self.starts}.json"
        plan_path.write_text(plan.to_json())
        log_path = Path(self.workdir) / f"host-{self.starts}.log"
        q: queue.Queue[protocol.Message | None] = queue.Queue()
        with open(log_path, "ab") as log:
            epoch = {EPOCH_ENV: repr(plan.epoch)} if plan.epoch else None  # a fault's after_s counts from it
            proc = spawn([sys.executable, "-m", "chipcheck.fleet.jax_runner", "--plan", str(plan_path)],
                         env=child_env(epoch), log=log, stdin=subprocess.DEVNULL, on_message=lambda _p, m: q.put(m))
        watch, killed, usage = Watch(self.timeout_s), False, ""
        try:
            while True:
                try:
                    msg = q.get(timeout=0.2)
                except queue.Empty:
                    if killed:
                        continue
                    waits_for_peers = watch.phase is Phase.BARRIER or base.is_collective((watch.current or ("",))[0])
                    if self.job and waits_for_peers and (lost := self.job.peer_lost()):
                        # a lost peer never reaches this barrier or collective: stop waiting now
                        self.peer_lost, killed = lost, True
                        self.lost_reason = f"not reached: {lost}"
                        kill_group(proc)
                    elif watch.overdue(time.monotonic()):
                        # after bye everything is reported: a process slow to leave the job is only ended
                        killed = watch.phase is not Phase.LEAVING
                        kill_group(proc)
                    continue
                if msg is None:
                    break
                watch.on(msg)
                if isinstance(msg, protocol.Hello):
                    self._hello(msg.devices, msg.ranks)
                elif isinstance(msg, protocol.Usage):
                    usage = msg.message
                elif isinstance(msg, protocol.Result):
                    self._record(msg.result)
                    if (c := watch.current) and all((*c, k) in self.done for k in watch.ranks):
                        watch.to(Phase.IDLE)
        finally:
            kill_group(proc)
        code = proc.wait()
        if usage:
            raise UsageError(usage)
        if watch.phase is Phase.LEAVING:
            return True
        if not watch.hello:
            why = "did not start in time" if killed else f"died at start-up ({exit_text(code)})"
            raise UsageError(f"the JAX host process {why}: {log_tail(log_path)}")
        if watch.barrier is not None:
            if not self.peer_lost:
                how = f"waited {watch.barrier[1]:g}s" if killed else f"died ({exit_text(code)})"
                self.lost_reason = f"the JAX job's processes never all reached {watch.barrier[0]} (this host {how})"
            return False
        if watch.current is None:
            raise UsageError(f"the JAX host process exited between cases ({exit_text(code)}): {log_tail(log_path)}")
        self._lost((*watch.current, list(watch.ranks)), killed, code, log_path)
        return False

    def _hello(self, devs: list[DeviceInfo], local: list[int]) -> None:
        if not self.devs:
            self.devs, self.local = devs, local
            n, kind = len(devs), _profile_kind(devs[0])
            self.planned = [(probe, c, r) for probe in _names(self.plan.probes, n)
                            for c in _cases(self.plan.profile, probe, n, kind, self.plan.cases) for r in range(n)]
            self.on_devices(devs)
        elif [d.uuid for d in devs] != [d.uuid for d in self.devs]:
            raise UsageError("the JAX devices changed between host processes "
                             f"({len(self.devs)} then {len(devs)}); was a device lost?")

    def _lost(self, current: tuple[str, str, list[int]], killed: bool, code: int, log_path: Path) -> None:
        """Record the case the host process was in, and the rest of that probe on those ranks."""
        probe, case, ranks = current
        p = self.plan
        if not self.peer_lost:
            how = "hung" if killed else f"died ({exit_text(code)})"
            self.lost_reason = f"its JAX process {how} in {probe} {case} on {self.devs[ranks[0]].host}"
        left = [c for c in self._cases_left(probe, ranks) if c != case]
        fates = []
        for rank in ranks:
            info = self.devs[rank]
            where = f"{probe} {case} on {info.host} {info.label} (rank {rank}, seed {p.seed})"
            if self.peer_lost:
                kind, msg = ErrorKind.CRASH, f"{where}: peer lost: {self.peer_lost}"
            elif killed:
                kind, msg = ErrorKind.TIMEOUT, (f"{where} exceeded its {self.timeout_s:g}s watchdog; "
                                                f"the JAX host process was killed")
            else:
                kind, msg = ErrorKind.CRASH, f"the JAX host process died in {where}: {exit_text(code)}. {log_tail(log_path)}"
            fates.append(lost_in(p.run_id, p.seed, info, rank, probe, case, kind, msg, left, "the JAX host process"))
        for r in [f[0] for f in fates] + [r for f in fates for r in f[1:]]:  # the lost case on every rank first
            self._record(r)  # (a rank that reported the case before the loss keeps its own result)

    def _abandon(self) -> None:
        """Multi-host: every case this host has not reported is recorded as not run."""
        p = self.plan
        for probe in _names(p.probes, len(self.devs)):
            left = self._cases_left(probe, self.local)
            for rank in self.local:
                for r in not_run(p.run_id, p.seed, self.devs[rank], rank, probe, left, ErrorKind.CRASH,
                                 self.lost_reason):
                    self._record(r)

    def _cases_left(self, probe: str, ranks: list[int]) -> list[str]:
        return [c for probe_, c, r in self.planned if probe_ == probe and r == ranks[0]
                and any((probe, c, k) not in self.done for k in ranks)]

    def _record(self, r: ProbeResult) -> None:
        if (r.probe, r.case, r.rank) not in self.done:
            self.done.add((r.probe, r.case, r.rank))
            self.keep(r)


class _Job:
    """This supervisor's part in a multi-host job: the run id from process 0, and every process's
    results at the end, through a key-value store (torch's TCPStore) that process 0's supervisor
    serves at the coordinator's port + 1. It lives outside the JAX processes, so the results of a
    job whose collective hung or whose host died still reach everyone."""

    def __init__(self, spec: Any, kv: Any, run_id: str):
        self.spec, self.kv, self.run_id = spec, kv, run_id
        self._polled = 0.0  # when peer_lost last asked the store

    @staticmethod
    def join(spec: Any, timeout: float) -> _Job:
        from . import jax_multihost
        from .distributed import Rendezvous

        host, port = jax_multihost.split_address(spec.coordinator)
        if port >= 65535:
            raise UsageError(f"coordinator port {port}: chipcheck also needs port {port + 1} there")
        try:
            kv = Rendezvous(spec.process_id, spec.num_processes, max(timeout, supervisor.STARTUP_TIMEOUT_S), addr=host,
                            port=port + 1)
        except Exception as e:  # TCPStore raises RuntimeError/DistStoreError: unreachable or port taken
            raise UsageError(f"{spec.label}: cannot reach the results store at {host}:{port + 1}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
        if spec.process_id == 0:
            run_id = new_run_id()
            kv.store.set("chipcheck/go", run_id)
        else:
            got = kv.wait_go(time.monotonic() + max(timeout, supervisor.STARTUP_TIMEOUT_S))
            if got is None:
                raise UsageError(f"{spec.label}: process 0 never started the run")
            run_id = got
        return _Job(spec, kv, run_id)

    def mark_lost(self, reason: str) -> None:
        """Tell the other processes' supervisors this host's JAX process is gone (they stop waiting)."""
        with contextlib.suppress(Exception):  # the store may be gone too: the others' watchdogs remain
            self.kv.store.set(f"chipcheck/lost/{self.spec.process_id}", reason)

    def peer_lost(self) -> str:
        """Another process's loss, as it told it ("" when none), looked up at most once a second."""
        now = time.monotonic()
        if now - self._polled < 1.0:
            return ""
        self._polled = now
        for p in range(self.spec.num_processes):
            key = f"chipcheck/lost/{p}"
            if p != self.spec.process_id and self.kv.store.check([key]):
                return f"process {p} of the JAX job: {self.kv.store.get(key).decode()}"
        return ""

    def exchange(self, mine: list[ProbeResult], sup: _Supervisor, timeout: float) -> list[ProbeResult]:
        """Publish this host's results; return every other process's (and an error for each case a
        process never reported: its host died or never finished)."""
        pid, n = self.spec.process_id, self.spec.num_processes
        self.kv.store.set(f"chipcheck/results/{pid}", json.dumps([r.to_dict() for r in mine]))
        parts = self.kv.wait_for("results", time.monotonic() + timeout)
        theirs = [ProbeResult.from_dict(d) for p, v in sorted(parts.items()) if p != pid for d in json.loads(v)]
        have = {(r.probe, r.case, r.rank) for r in [*mine, *theirs]}
        p = sup.plan
        silent = sorted(set(range(n)) - set(parts))
        for probe, case, rank in sup.planned:
            if (probe, case, rank) not in have:
                info = sup.devs[rank]
                theirs.append(error_result(p.run_id, p.seed, info, rank, probe, case, ErrorKind.CRASH,
                                           f"rank {rank} ({info.label} on {info.host}) never reported {probe} {case}: "
                                           f"process(es) {silent} of the JAX job sent no results within "
                                           f"{timeout:g}s"))
        self.kv.store.set(f"chipcheck/read/{pid}", "1")
        if pid == 0:  # the store lives in this process: keep it up until every reader is done
            self.kv.wait_for("read", time.monotonic() + 60.0)
        return theirs


# ---- the host process -------------------------------------------------------------------------


def _profile_kind(info: DeviceInfo) -> str:
    """The profile rows a device takes: TPUs and GPUs the accelerator shapes (the "cuda" rows)."""
    return "cpu" if info.kind.value == "cpu" else "cuda"


def _names(probes: list[str], n_devices: int) -> list[str]:
    """The probes of a run: those asked for, else every default JAX probe the job's devices allow."""
    reg = base.registry()
    return list(probes) or [p for p in jax_probes() if reg[p].default and reg[p].min_devices <= n_devices]


def _config(profile: str, probe: str, device_kind: str) -> Any:
    return base.get(probe).config(profile, device_kind, frozenset())


def _cases(profile: str, probe: str, n_devices: int, device_kind: str,
           named: dict[str, list[str]] | None = None) -> list[str]:
    """The cases of one JAX probe (the same names as the torch path's); `named` overrides a probe's."""
    if base.registry()[probe].min_devices > n_devices:
        return []
    if named and probe in named:
        return list(named[probe])
    cases: list[str] = _entry(probe).cases(_config(profile, probe, device_kind))
    return cases


def never_fires(plan: HostPlan, names: list[str], world: int) -> str:
    """Why one of the run's `--inject` faults can never fire (a usage error), checked where the world is
    known: every process of a job refuses alike. Only the main stage asks: a retest stage (the judge
    names its cases) runs the retest alone, and the faults are the whole run's."""
    from ..probes import faults
    from ..probes import jax_backend as jb

    if plan.cases:
        return ""
    # a single host's run may go on to a retest, whose turns a fault can slow
    return faults.never_fires(plan.inject, world, names + ([] if plan.multihost else ["retest"]), jb.OPS)


def host_run(plan: HostPlan, send: Callable[[protocol.Message], None]) -> int:
    """Run the plan on this host's JAX devices, streaming the worker protocol through `send`."""
    from ..probes import faults
    from ..probes import jax_backend as jb
    from . import jax_devices

    if plan.multihost:
        from . import jax_multihost

        spec = jax_multihost.MultiHost(**{**plan.multihost, "local_device_ids": plan.multihost["local_device_ids"]
                                          and tuple(plan.multihost["local_device_ids"])})
        try:
            jax_multihost.initialize(spec)  # before anything starts a JAX backend
        except jax_multihost.MultiHostError as e:
            send(protocol.Usage(message=str(e)))
            return 2
    settings = jb.init()
    try:
        job = jax_devices.discover_global(os.environ.get("CHIPCHECK_HOSTNAME") or None)
    except jax_devices.DeviceSpecError as e:
        send(protocol.Usage(message=str(e)))
        return 2
    jdevs, infos, local = job.devices, job.infos, list(job.local)
    for name in plan.probes:
        if (need := base.registry()[name].min_devices) > len(infos):
            send(protocol.Usage(message=f"probe {name!r} needs at least {need} devices; JAX sees {len(infos)} "
                                        "on this host"))
            return 2
    names = _names(plan.probes, len(infos))
    kind = _profile_kind(infos[0])
    try:
        configs = {name: _config(plan.profile, name, kind) for name in names}
    except base.InvalidConfig as e:
        send(protocol.Usage(message=str(e)))
        return 2
    if why := never_fires(plan, names, len(jdevs)):
        send(protocol.Usage(message=why))
        return 2
    fault_list = [f for spec in plan.inject for f in faults.parse(spec)]
    if plan.multihost:
        settings["process_index"], settings["process_count"] = job.process_index, job.process_count
    send(protocol.Hello(pid=os.getpid(), ranks=local, devices=infos, settings=settings))
    done = set(plan.done)

    def barrier(tag: str) -> None:
        """Multi-host: wait here for every process of the job (not under a case's watchdog: the
        supervisor bounds the wait by how far behind another host can be)."""
        if not plan.multihost:
            return
        from jax.experimental import multihost_utils

        per_device = sum(len(_cases(plan.profile, n, len(jdevs), kind, plan.cases)) for n in names
                         if not base.is_collective(n))
        send(protocol.Barrier(name=tag, cases=per_device * len(local)))
        multihost_utils.sync_global_devices(f"chipcheck/{plan.run_id}/{tag}")
        send(protocol.Synced())

    def cases() -> Iterator[Case]:
        """Each matmul and attention case on each of this host's devices in turn, each collectives case
        once over all of them."""
        for name in names:
            cfg = configs[name]
            injectors = [jb.Injector.for_rank(fault_list, r, name) for r in range(len(jdevs))]
            entry, collective = _entry(name), base.is_collective(name)
            if collective:
                barrier(name)  # so no host's first collective waits, on its watchdog, for the others
            for case in _cases(plan.profile, name, len(jdevs), kind, plan.cases):
                if collective:
                    yield Case(probe=name, case=case, ranks=local, runs=_Call(
                        lambda entry=entry, case=case, cfg=cfg, inj=injectors: [
                            outs[r] for outs in [entry.run_ranks(jdevs, cfg, case, inj, plan.options)] for r in local]))
                    continue
                for rank in local:
                    yield Case(probe=name, case=case, ranks=[rank], runs=_Call(
                        lambda entry=entry, d=jdevs[rank], case=case, cfg=cfg, inj=injectors[rank]: entry.run_case(
                            d, cfg, case, plan.seed, inj)))

    CaseLoop(run_id=plan.run_id, seed=plan.seed, infos=dict(enumerate(infos)), settings=settings,
             fault_list=fault_list, keep=lambda c, r: send(protocol.Result(result=r)),
             skip=lambda c: all((c.probe, c.case, r) in done for r in c.ranks),  # reported by a lost host process
             start=lambda c: send(protocol.Start(probe=c.probe, case=c.case, ranks=c.ranks))).run(cases())
    # Multi-host: process 0 serves the job's coordinator, and a process still computing when it
    # goes is aborted by JAX: everyone leaves together.
    barrier("end")
    send(protocol.Bye())
    if plan.multihost:
        from . import jax_multihost

        jax_multihost.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--plan":
        print("usage: python -m chipcheck.fleet.jax_runner --plan PLAN.json  (started by chipcheck run "
              "--backend jax)", file=sys.stderr)
        return 2
    plan = HostPlan.from_json(Path(argv[1]).read_text())
    return host_run(plan, protocol.Sender(protocol.open_channel()))


if __name__ == "__main__":
    sys.exit(main())
