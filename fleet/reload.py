"""Rebuild a run's `RunSummary` from the results store, for `chipcheck report` (reports never read the store).

The stored results and fleet judgements are the record; the summary is derived from them exactly as
at the end of `chipcheck run` (fleet.summary.summarize), and the consensus groups are recounted from
the stored output hashes (fleet.judge.consensus). A run that was interrupted still loads: its
devices without results read as `error`, its status is `interrupted` and its missing cases are listed
(`run_status`): marked so by the run itself on SIGINT/SIGTERM, or found so when the run has no end and
its process is gone (SIGKILL, a lost host).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..results import (
    ConsensusGroup,
    DeviceSummary,
    RunStatus,
    RunSummary,
    Verdict,
)
from .judge.speed import SpeedPolicy
from .store import Store, StoreError
from .summary import summarize

LATEST = "latest"


class RunNotFound(LookupError):
    """The run id is not in the store (one line for the user, exit 2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """The `runs` row of one run: what the summary needs beyond results and judgements."""

    run_id: str
    started: float
    ended: float | None
    profile: str
    seed: int
    min_gap: float
    backend: str = "torch"
    host: str = ""
    status: str | None = None
    """As stored: running, complete, interrupted (None: a store from before run status)."""
    pid: int | None = None
    """The process of `chipcheck run` (config), to tell a run in progress from one that was killed."""
    plan: list[tuple[str, list[str]]] | None = None
    """The planned (probe, cases) (config), to list what an interrupted run did not reach."""
    baselines: str = ""
    """The run's --baselines file (config; "": the shipped table), for judging it again."""
    declared: str = ""
    """The run's declared topology file (config; "": none)."""


def open_existing(path: str | Path) -> Store:
    """Open a store that must already exist, read-only: reading a report never creates or changes a file."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"no results store at {p}; run `chipcheck run` first or pass --db")
    return Store(p, readonly=True)


def resolve(store: Store, run_id: str) -> str:
    """`latest` -> the newest run; an id prefix that names one run -> its full id."""
    if run_id == LATEST:
        latest = store.latest_run()
        if latest is None:
            raise RunNotFound(f"the store {store.path} holds no runs yet")
        return latest
    ids = [run.run_id for run in store.runs()]
    if run_id in ids:
        return run_id
    hits = [r for r in ids if r.startswith(run_id)] if run_id else []
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise RunNotFound(f"run id {run_id!r} is ambiguous in {store.path}: {', '.join(hits[:5])}")
    recent = ", ".join(r for r in ids[-3:]) or "none"
    raise RunNotFound(f"no run {run_id!r} in {store.path} (latest: {recent}); try `latest`")


def record(store: Store, run_id: str) -> RunRecord:
    try:
        row = store.run(run_id)
        status = store.run_status(run_id)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{store.path} cannot be read ({e})") from None
    if row is None:
        raise RunNotFound(f"no run {run_id!r} in {store.path}")
    config = row.config
    try:
        min_gap = float(config.get("min_gap", SpeedPolicy().min_gap))
    except (TypeError, ValueError):
        min_gap = SpeedPolicy().min_gap
    backend = str(config.get("backend", "torch"))
    pid = config.get("pid")
    files = {k: str(config.get(k) or "") for k in ("baselines", "declared")}
    return RunRecord(run_id=row.run_id, started=row.started, ended=row.ended, profile=row.profile, seed=row.seed,
                     min_gap=min_gap, backend=backend, host=row.host, status=status,
                     pid=pid if isinstance(pid, int) else None, plan=_plan(config.get("plan")), **files)


def _plan(raw: Any) -> list[tuple[str, list[str]]] | None:
    if not isinstance(raw, list):
        return None
    try:
        return [(str(p), [str(c) for c in cases]) for p, cases in raw]
    except (TypeError, ValueError):
        return None


def run_status(rec: RunRecord) -> RunStatus:
    """Whether a stored run reached its end. A run with no end whose process is gone was killed."""
    if rec.status == "complete" or (rec.status is None and rec.ended is not None):
        return RunStatus.COMPLETE
    if rec.status == "interrupted":
        return RunStatus.INTERRUPTED
    return RunStatus.RUNNING if _alive(rec) else RunStatus.INTERRUPTED


def _alive(rec: RunRecord) -> bool:
    """The run's own process still runs (this host, that pid, started no later than the run)."""
    import os
    import socket

    if rec.pid is None or rec.host != socket.gethostname():
        return False
    try:
        stat = Path(f"/proc/{rec.pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    return started <= rec.started + 1.0  # a later process that got the pid is not the run


def missing_cases(rec: RunRecord, ranks: list[int], have: set[tuple[int, str, str]]) -> list[str]:
    """Planned cases of a run that have no result, "rank N probe case" (devices without any result
    when the plan was not stored)."""
    if rec.plan is None:
        seen = {r for r, _, _ in have}
        return [f"rank {r}: no results" for r in ranks if r not in seen]
    return [f"rank {r} {p} {c}" for r in ranks for p, cases in rec.plan for c in cases if (r, p, c) not in have]


def load(store: Store, run_id: str = LATEST) -> RunSummary:
    """The summary of one stored run (`latest` or an id, or a unique id prefix)."""
    rec = record(store, resolve(store, run_id))
    skipped_before = store.skipped_rows
    try:
        results = store.results(rec.run_id)
        judgements = store.judgements(rec.run_id)
        devices = store.devices(rec.run_id)
    except (sqlite3.DatabaseError, ValueError, KeyError) as e:
        raise StoreError(f"run {rec.run_id} in {store.path} cannot be read ({e})") from None
    from .judge.verdicts import fleet_verdicts, own_history

    status = run_status(rec)
    # a judged run's stored judgements are the record; an interrupted one is judged as the run would have
    judged = judgements if status is RunStatus.COMPLETE or judgements else None
    not_judged: list[str] = []
    # judged again (a run cut short): with what the live run would have read, its own files and each
    # device's stored history included
    table, declared, lost = (None, None, []) if judged is not None else _judged_with(rec)
    not_judged += lost
    own = [] if judged is not None else own_history(store, devices, results, rec.run_id, rec.started)
    try:
        v = fleet_verdicts(devices, results, min_gap=rec.min_gap, judged=judged, baselines=table, declared=declared,
                           own=own)
    except ArithmeticError as e:
        if judged is not None:
            raise
        # a cut-short run's few results can be beyond a fleet analysis: its local verdicts still stand
        v = fleet_verdicts(devices, results, min_gap=rec.min_gap, judged=[])
        not_judged = [f"the fleet judgement of this {status.value} run's partial results failed "
                      f"({type(e).__name__}: {e}); verdicts are the devices' own checks only"]
    ended = rec.ended if rec.ended is not None else max((r.ended for r in results), default=rec.started)
    links = store.links(rec.run_id)
    # rows the store could not decode (written by an older, trusting ingest) are left out, and said so
    skipped = store.skipped_rows - skipped_before
    unreadable = [f"{skipped} stored rows of run {rec.run_id} could not be read and were left out"] if skipped else []
    missing: list[str] = []
    notice: list[str] = []
    if status is not RunStatus.COMPLETE:
        missing = missing_cases(rec, sorted(devices), {(r.rank, r.probe, r.case) for r in results})
        shown = ", ".join(missing[:5]) + (f", ... (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        notice = [f"run {status.value.upper()}: {len(missing)} planned case(s) have no result"
                  + (f" ({shown})" if missing else "") + "; the verdict covers only what was measured"]
    summary = summarize(rec.run_id, devices, results, v.judgements, v.groups, profile=rec.profile, seed=rec.seed,
                        started=rec.started, ended=ended, links=links,
                        findings=notice + not_judged + v.findings + unreadable,
                        exonerate=v.library.exonerate, fleet_verdict=v.library.fleet_verdict)
    return replace(summary, status=status, missing=missing)


def _judged_with(rec: RunRecord) -> tuple[Any, dict[int, tuple[str, ...]] | None, list[str]]:
    """The baseline table and declared topology the run was judged with (its own files), and a line
    for each that can no longer be read (then: the shipped table, no declared topology)."""
    from .judge import baselines
    from .runner import UsageError, load_declared

    said: list[str] = []
    table = declared = None
    if rec.baselines:
        try:
            table = baselines.load(rec.baselines)
        except baselines.BaselineError as e:
            said.append(f"the run's --baselines file cannot be read now ({e}); judged with the shipped table")
    if rec.declared:
        try:
            declared = load_declared(rec.declared)
        except UsageError as e:
            said.append(f"the run's declared topology cannot be read now ({e}); judged without it")
    return table, declared, said


def load_many(store: Store, run_ids: list[str]) -> RunSummary:
    """Several stored runs as one report, side by side: e.g. the torch run of the GPU hosts and the
    JAX run of the TPU hosts. Each run is judged as it was (its own consensus groups, its own slow
    peers: a fingerprint holds the backend, so no vote mixes them); devices are ranked run after run
    and keep their host, uuid and fingerprint. The verdict is the worst; links are kept only when
    one run has them."""
    ids = list(dict.fromkeys(resolve(store, r) for r in run_ids))
    if len(ids) == 1:
        return load(store, ids[0])
    parts = [(record(store, r), load(store, r)) for r in ids]
    devices: list[DeviceSummary] = []
    groups: list[ConsensusGroup] = []
    findings: list[str] = []
    links = [s.links for _, s in parts if s.links is not None]
    for rec, s in parts:
        off = len(devices)
        devices += [replace(d, rank=d.rank + off) for d in s.devices]
        groups += [replace(g, dissenters=tuple(r + off for r in g.dissenters)) for g in s.groups]
        span = f"ranks {off}-{len(devices) - 1}" if s.devices else "no devices"
        findings.append(f"run {rec.run_id}: {span}, backend {rec.backend}, profile {rec.profile}, "
                        f"verdict {s.verdict.value}")
        findings += [f"run {rec.run_id}: {f}" for f in s.findings]
    summaries = [s for _, s in parts]
    profiles = {s.profile for s in summaries}
    seeds = {s.seed for s in summaries}
    incomplete = [s for s in summaries if s.status is not RunStatus.COMPLETE]
    status = RunStatus.INTERRUPTED if any(s.status is RunStatus.INTERRUPTED for s in incomplete) else \
        (RunStatus.RUNNING if incomplete else RunStatus.COMPLETE)
    return RunSummary(run_id="+".join(ids), verdict=Verdict.worst([s.verdict for s in summaries]),
                      status=status, missing=[f"run {s.run_id}: {m}" for s in incomplete for m in s.missing],
                      started=min(s.started for s in summaries), ended=max(s.ended for s in summaries),
                      profile=profiles.pop() if len(profiles) == 1 else "mixed",
                      seed=seeds.pop() if len(seeds) == 1 else summaries[0].seed, devices=devices, groups=groups,
                      links=links[0] if len(links) == 1 else None, findings=findings)
