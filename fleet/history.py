"""Every run is kept: a device's verdicts and speed over runs, the fleet's trends, and what is new.

The store's `device_runs` table is a derived index: one row per device per judged run (verdict,
speed relative to its fingerprint peers in that run, whether it was wrong or flaky), built here
from the run's report (fleet.reload: the same device verdicts) the first time a run is looked at, so history and trends never
re-parse every result body. The trend logic itself is pure (fleet.trends); this module turns
store rows into arrays and findings.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import failures
from ..failures import FailureCode
from ..results import (
    SEVERITY,
    DeviceInfo,
    DeviceSummary,
    HistoryPoint,
    ProbeResult,
    ReportExtras,
    RunSummary,
    Verdict,
)
from . import reload, trends
from .store import DeviceRun, LinkRow, Store, StoreError
from .summary import registry_speed_metrics

SPEED_METRICS = ("tflops_best", "busbw_gbps_best", "gbps_best")
"""Speed metrics (higher is better) a device's history follows for a probe the registry does not know
(first present per result); a registered probe is followed by its registry `speed_metric`, the one the
speed judge reads (a burn's median TFLOP/s, not its best call: a throttling chip keeps its early best)."""
_VERDICTS = sorted(SEVERITY, key=lambda v: SEVERITY[v])  # index = severity; -1 = not in that run


def device_rows(run_id: str, started: float, devices: dict[int, DeviceInfo], results: list[ProbeResult],
                judged: Mapping[int, DeviceSummary], speed_metrics: Mapping[str, str] | None = None) -> list[DeviceRun]:
    """The per-device rows of one judged run (pure). `judged`: rank -> the device as the run's report
    judged it (blame and fleet findings applied: a corrupted gradient every rank received is the
    sender's, not theirs); a device missing there never reported. `speed_metrics`: probe -> the metric
    its speed is read by (default: the registry's; "" for a probe not judged on speed per device)."""
    if speed_metrics is None:
        speed_metrics = registry_speed_metrics()
    speeds: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in results:
        metric = speed_metrics.get(r.probe)
        if metric is None:  # not a registered probe
            v = next((r.metrics[m] for m in SPEED_METRICS if m in r.metrics), None)
        else:  # "": not judged on speed per device
            v = r.metrics.get(metric) if metric else None
        if r.error is None and v is not None and v > 0:
            speeds[(r.fingerprint, r.probe, r.case)][r.rank] = v
    ratios: dict[int, list[float]] = defaultdict(list)
    for vals in speeds.values():
        if len(vals) >= 2:
            med = statistics.median(vals.values())
            for rank, v in vals.items():
                ratios[rank].append(v / med)
    out = []
    for rank, d in sorted(devices.items()):
        j = judged.get(rank)
        vs = [p.verdict for p in j.probes] if j is not None else []
        out.append(DeviceRun(run_id=run_id, rank=rank, uuid=d.uuid, host=d.host, device=d.label,
                             fingerprint=d.fingerprint, started=started,
                             verdict=j.verdict if j is not None else Verdict.ERROR,
                             speed_ratio=statistics.median(ratios[rank]) if ratios.get(rank) else None,
                             wrong=Verdict.WRONG in vs, flaky=Verdict.FLAKY in vs))
    return out


DEVICE_RUNS_RULE = 2
"""How device_runs rows are derived. 1: a device's worst case verdict, blame ignored (every rank that
received a bad chip's gradient read `wrong`); 2: its verdict in the run's report. Rows of an older rule
are built again."""


def index(store: Store) -> int:
    """Add the device_runs rows of every judged run not indexed yet; returns how many runs were added."""
    if store.derived_rule("device_runs") < DEVICE_RUNS_RULE:
        store.rebuild_device_runs(DEVICE_RUNS_RULE)
    done = store.indexed_runs()
    added = 0
    for run in store.runs():
        if run.run_id in done or run.verdict is None:  # an unjudged (interrupted) run has no fleet verdicts yet
            continue
        judged = reload.load(store, run.run_id)  # the device verdicts its report gives, nothing else
        rows = device_rows(run.run_id, run.started, store.devices(run.run_id), store.results(run.run_id),
                           {d.rank: d for d in judged.devices})
        store.add_device_runs(rows)
        added += 1
    return added


def device_history(store: Store, key: str) -> list[DeviceRun]:
    """One device's runs (by UUID) or one host's devices' runs (by host name), oldest first."""
    index(store)
    return store.device_runs(uuid=key) or store.device_runs(host=key)


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """Something the history shows about one device or link."""

    code: FailureCode
    subject: str
    """Device UUID, or `src_host src_dev -> dst_host dst_dev` for a link."""
    hosts: tuple[str, ...]
    device: str
    run_id: str
    """The run the change began in (drops) or the latest run (flaky, lemon)."""
    detail: str
    new: bool
    """Not seen before the latest sweep: the first thing a sweep reports."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewFailure:
    """A device failing in the latest sweep that passed (or was absent) the last time it was checked."""

    uuid: str
    host: str
    device: str
    verdict: Verdict
    before: Verdict | None
    """Its verdict the previous time it was in a sweep (None: first time seen)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrendReport:
    runs: list[str]
    latest: str | None
    new_failures: list[NewFailure] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def new_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.new]


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetArrays:
    """The fleet's history as arrays: one row per device, one column per run (oldest first)."""

    uuids: list[str]
    hosts: list[str]
    devices: list[str]
    run_ids: list[str]
    ratio: np.ndarray
    """float, NaN where absent or unmeasured."""
    verdict: np.ndarray
    """int8 severity index into _VERDICTS, -1 where absent."""
    flaky: np.ndarray
    wrong: np.ndarray


def arrays(rows: Iterable[DeviceRun]) -> FleetArrays:
    rows = list(rows)
    run_ids = list(dict.fromkeys(r.run_id for r in sorted(rows, key=lambda r: r.started)))
    col = {r: i for i, r in enumerate(run_ids)}
    who: dict[str, int] = {}
    hosts, devs = [], []
    for r in rows:
        if r.uuid not in who:
            who[r.uuid] = len(who)
            hosts.append(r.host)
            devs.append(r.device)
    shape = (len(who), len(run_ids))
    ratio = np.full(shape, np.nan)
    verdict = np.full(shape, -1, dtype=np.int8)
    flaky, wrong = np.zeros(shape, bool), np.zeros(shape, bool)
    for r in rows:
        i, j = who[r.uuid], col[r.run_id]
        ratio[i, j] = np.nan if r.speed_ratio is None else r.speed_ratio
        verdict[i, j] = SEVERITY[r.verdict]
        flaky[i, j], wrong[i, j] = r.flaky, r.wrong
    return FleetArrays(uuids=list(who), hosts=hosts, devices=devs, run_ids=run_ids, ratio=ratio, verdict=verdict,
                       flaky=flaky, wrong=wrong)


def analyze(a: FleetArrays, link_rows: list[LinkRow] | None = None,
            policy: trends.TrendPolicy = trends.TrendPolicy()) -> TrendReport:
    """New failures of the latest sweep, then drops, flaky turns, lemons and slower links (pure)."""
    if not a.run_ids:
        return TrendReport(runs=[], latest=None)
    findings: list[Finding] = []
    for row, cp in sorted(trends.drops(a.ratio, policy).items()):
        # new: the same scan without the latest sweep did not find it
        new = trends.change_point([None if np.isnan(v) else float(v) for v in a.ratio[row, :-1]], policy) is None
        findings.append(Finding(code=failures.TREND_SLOWER, subject=a.uuids[row], hosts=(a.hosts[row],),
                                device=a.devices[row], run_id=a.run_ids[cp.index], new=new,
                                detail=f"speed vs peers fell from {cp.before:.3f}x to {cp.after:.3f}x "
                                       f"({cp.ratio:.2f} of its level) from run {a.run_ids[cp.index]} on (t={cp.score:.1f})"))
    flags = np.stack([a.flaky, a.wrong], axis=-1)
    turned, lemons = trends.flags_matrix(flags, policy)
    t_before, l_before = trends.flags_matrix(flags[:, :-1], policy)
    n_last = min(policy.lemon_n, len(a.run_ids))
    for row in np.nonzero(lemons)[0].tolist():
        findings.append(Finding(code=failures.LEMON, subject=a.uuids[row], hosts=(a.hosts[row],),
                                device=a.devices[row], run_id=a.run_ids[-1], new=not l_before[row],
                                detail=f"wrong in {lemons[row]} of its last {n_last} runs"))
    for row in np.nonzero(turned)[0].tolist():
        findings.append(Finding(code=failures.TREND_FLAKY, subject=a.uuids[row], hosts=(a.hosts[row],),
                                device=a.devices[row], run_id=a.run_ids[-1], new=not t_before[row],
                                detail=f"flaky in {int(a.flaky[row, -policy.flaky_n:].sum())} of its last "
                                       f"{policy.flaky_n} runs after a clean past"))
    findings += _link_findings(link_rows or [], a.run_ids, policy)
    return TrendReport(runs=a.run_ids, latest=a.run_ids[-1], new_failures=_new_failures(a), findings=findings)


def _new_failures(a: FleetArrays) -> list[NewFailure]:
    v = a.verdict
    if v.shape[1] == 0:
        return []
    last = v[:, -1]
    cols = np.arange(v.shape[1] - 1)
    prev_idx = np.maximum.accumulate(np.where(v[:, :-1] >= 0, cols, -1), axis=1)[:, -1] if v.shape[1] > 1 \
        else np.full(len(v), -1)
    prev = np.where(prev_idx >= 0, v[np.arange(len(v)), np.maximum(prev_idx, 0)], -1)
    out = []
    for row in np.nonzero((last > 0) & (prev <= 0))[0]:
        out.append(NewFailure(uuid=a.uuids[row], host=a.hosts[row], device=a.devices[row],
                              verdict=_VERDICTS[last[row]], before=_VERDICTS[prev[row]] if prev[row] >= 0 else None))
    return out


def _link_findings(rows: list[LinkRow], run_ids: list[str], policy: trends.TrendPolicy) -> list[Finding]:
    """Links whose bandwidth, relative to each run's median link, fell against their own history."""
    if not rows:
        return []
    col = {r: i for i, r in enumerate(run_ids)}
    per_run: dict[str, list[float]] = defaultdict(list)
    for x in rows:
        if x.gbps:
            per_run[x.run_id].append(x.gbps)
    med = {r: statistics.median(v) for r, v in per_run.items()}
    keys: dict[tuple[str, str, str, str], int] = {}
    for x in rows:
        keys.setdefault(x.ends, len(keys))
    m = np.full((len(keys), len(run_ids)), np.nan)
    for x in rows:
        if x.gbps and x.run_id in col:
            m[keys[x.ends], col[x.run_id]] = x.gbps / med[x.run_id]
    names = list(keys)
    out = []
    for row, cp in sorted(trends.drops(m, policy).items()):
        sh, sd, dh, dd = names[row]
        new = trends.change_point([None if np.isnan(v) else float(v) for v in m[row, :-1]], policy) is None
        out.append(Finding(code=failures.TREND_LINK, subject=f"{sh} {sd} -> {dh} {dd}", hosts=(sh, dh), device=sd,
                           run_id=run_ids[cp.index], new=new,
                           detail=f"bandwidth vs the run's median link fell from {cp.before:.2f}x to {cp.after:.2f}x "
                                  f"from run {run_ids[cp.index]} on (t={cp.score:.1f})"))
    return out


def report(store: Store, policy: trends.TrendPolicy = trends.TrendPolicy(), upto: str | None = None) -> TrendReport:
    """The trend report over every judged run in the store (or those up to and including `upto`)."""
    index(store)
    rows = store.device_runs()
    links = store.link_rows()
    if upto is not None:
        cutoff = next((r.started for r in rows if r.run_id == upto), None)
        if cutoff is not None:
            rows = [r for r in rows if r.started <= cutoff]
            links = [x for x in links if x.started <= cutoff]
    return analyze(arrays(rows), links, policy)


MAX_HISTORY_DEVICES = 500
"""Devices whose history a report carries: every failing one first, then others up to this many."""


def report_extras(store: Store, summary: RunSummary) -> ReportExtras:
    """The report's optional sections for a stored run: links/topology and each device's history."""
    base = ReportExtras.from_links(summary) if summary.links is not None else ReportExtras()
    ordered = [d for d in summary.devices if d.verdict is not Verdict.PASS] + [d for d in summary.devices if d.verdict is Verdict.PASS]
    hist: dict[str, list[HistoryPoint]] = {}
    for d in ordered[:MAX_HISTORY_DEVICES]:
        runs = [r for r in device_history(store, d.uuid) if r.started <= summary.started]
        if len(runs) >= 2:
            hist[d.uuid] = [HistoryPoint(run_id=r.run_id, started=r.started, verdict=r.verdict,
                                         throughput_ratio=r.speed_ratio) for r in runs]
    devices = {}
    min_gap = None
    for rid in summary.run_id.split("+"):  # load_many joins the ids of the runs it shows side by side
        try:
            devices.update({d.uuid: d for d in store.devices(rid).values()})
            min_gap = reload.record(store, rid).min_gap if min_gap is None else min_gap
        except (reload.RunNotFound, StoreError, sqlite3.DatabaseError, ValueError, KeyError):
            continue  # the report still renders, without serials and libraries
    return ReportExtras(links=base.links, topology=base.topology, history=hist, devices=devices, min_gap=min_gap)
