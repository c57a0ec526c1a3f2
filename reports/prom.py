"""The run as Prometheus metrics in the node_exporter textfile-collector format, via `prometheus-client`.

A nightly sweep writes this file into node_exporter's `--collector.textfile.directory`; the fleet's
Prometheus then alerts on it (docs/integrations.md has example rules). Per device (labels host,
uuid, fingerprint, device):
- `chipcheck_device_verdict{verdict=...}`: 1 for the device's verdict, 0 for the others (a state set);
- `chipcheck_device_failure{code,severity,action}`: 1 for the device's worst failure code (failing
  devices only), and `chipcheck_device_failure_severity` (0 none .. 4 critical) for every device;
- throughput per probe case: `chipcheck_device_tflops`, `chipcheck_device_tokens_per_second`,
  `chipcheck_device_memory_bandwidth_gbps` (bandwidth and memory probes), `chipcheck_device_busbw_gbps`
  (collectives: the link bus bandwidth each rank saw), each with labels probe and case;
- `chipcheck_device_days_since_pass`: 0 when it passed in this run, else the days since the last
  stored run it passed (absent when it never passed in the history the report was given).
Per run: `chipcheck_run_info{run_id,profile,verdict,status}`, device counts, `chipcheck_run_failing_fraction`
and the end time; per judged link direction, `chipcheck_link_gbps` and `chipcheck_link_ok`.
No sample carries a timestamp (the textfile collector refuses them); the run's end time is a metric.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .. import failures
from ..results import BLAMED, DeviceSummary, RunSummary, Verdict
from .extras import HistoryPoint, ReportExtras

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DEVICE_LABELS = ("host", "uuid", "fingerprint", "device")
_CASE = (*DEVICE_LABELS, "probe", "case")
# (metric name, help, the probe metric it reads, the probes it is read from; None = any probe)
_SPEEDS: tuple[tuple[str, str, str, frozenset[str] | None], ...] = (
    ("chipcheck_device_tflops", "Median throughput of one probe case, TFLOP/s.", "tflops", None),
    ("chipcheck_device_tokens_per_second", "Median training throughput of one probe case, tokens/s.",
     "tokens_per_s", None),
    ("chipcheck_device_memory_bandwidth_gbps", "Memory bandwidth of one probe case, GB/s.", "gbps",
     frozenset({"bandwidth", "memory"})),
    ("chipcheck_device_busbw_gbps", "Collective bus bandwidth (nccl-tests busbw) of one probe case, GB/s.",
     "busbw_gbps", None),
)
DAY_S = 86400.0


def days_since_pass(d: DeviceSummary, now: float, history: list[HistoryPoint]) -> float | None:
    """0 when `d` passed in this run, else days from its last passing run in `history` to `now`; None
    when it never passed there."""
    if d.verdict is Verdict.PASS:
        return 0.0
    passed = [h.started for h in history if h.verdict is Verdict.PASS and h.started <= now]
    return (now - max(passed)) / DAY_S if passed else None


def render(s: RunSummary, extras: ReportExtras | None = None) -> str:
    """The metrics of `s` as node_exporter textfile text."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    extras = extras or ReportExtras()
    reg = CollectorRegistry(auto_describe=True)

    def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(name, doc, labels, registry=reg)

    info = gauge("chipcheck_run_info", "The run this file describes (value 1); status: complete, or interrupted "
                 "(its verdict covers only what it measured).", ("run_id", "profile", "verdict", "status"))
    info.labels(s.run_id, s.profile, s.verdict.value, s.status.value).set(1)
    gauge("chipcheck_run_devices", "Devices in the run.", ()).set(len(s.devices))
    gauge("chipcheck_run_failing_devices", "Devices blamed for a failure of their own (wrong, slow, flaky, "
          "error).", ()).set(len(s.failed))
    gauge("chipcheck_run_suspect_devices", "Devices of a group holding a fault no check pinned on one member.",
          ()).set(len(s.suspect))
    gauge("chipcheck_run_failing_fraction", "Failing devices / devices (0..1).",
          ()).set(len(s.failed) / len(s.devices) if s.devices else 0.0)
    gauge("chipcheck_run_end_timestamp_seconds", "When the run ended, Unix time.", ()).set(s.ended)

    verdict = gauge("chipcheck_device_verdict", "1 for the device's verdict in this run, 0 for the others.",
                    (*DEVICE_LABELS, "verdict"))
    failure = gauge("chipcheck_device_failure", "The device's worst failure code (value 1; failing devices only).",
                    (*DEVICE_LABELS, "code", "severity", "action"))
    severity = gauge("chipcheck_device_failure_severity",
                     "Severity of the device's worst failure code: 0 none, 1 low, 2 medium, 3 high, 4 critical.",
                     DEVICE_LABELS)
    blamed = gauge("chipcheck_device_failing", "1 when the device is blamed for a failure of its own.", DEVICE_LABELS)
    since = gauge("chipcheck_device_days_since_pass", "Days since the device last passed (0: it passed in this run).",
                  DEVICE_LABELS)
    speeds = [(gauge(name, doc, _CASE), key, probes) for name, doc, key, probes in _SPEEDS]
    for d in s.devices:
        who = (d.host, d.uuid, d.fingerprint, d.device)
        for v in Verdict:
            verdict.labels(*who, v.value).set(1 if d.verdict is v else 0)
        code = failures.worst([c for c in (failures.for_probe(p) for p in d.probes) if c is not None])
        severity.labels(*who).set(int(code.severity) if code else 0)
        if code is not None:
            failure.labels(*who, code.code, code.severity.label, code.action.value).set(1)
        blamed.labels(*who).set(1 if d.verdict in BLAMED else 0)
        days = days_since_pass(d, s.ended, extras.history.get(d.uuid, []))
        if days is not None:
            since.labels(*who).set(days)
        for p in d.probes:
            for key, value in p.metrics.items():
                case, _, metric = key.rpartition(":")
                for g, want, probes in speeds:
                    if metric == want and (probes is None or p.probe in probes) and math.isfinite(value):
                        g.labels(*who, p.probe, case).set(value)
    _links(s, reg)
    return generate_latest(reg).decode()


def _links(s: RunSummary, reg: CollectorRegistry) -> None:
    if s.links is None or not s.links.links:
        return
    from prometheus_client import Gauge

    ends = ("src_host", "src_uuid", "dst_host", "dst_uuid")
    gbps = Gauge("chipcheck_link_gbps", "Measured bandwidth of one link direction, GB/s.", ends, registry=reg)
    ok = Gauge("chipcheck_link_ok", "1 when the link direction passed.", ends, registry=reg)
    by_rank = {d.rank: d for d in s.devices}
    for x in s.links.links:
        a, b = by_rank.get(x.src), by_rank.get(x.dst)
        who = (a.host if a else "", a.uuid if a else str(x.src), b.host if b else "", b.uuid if b else str(x.dst))
        ok.labels(*who).set(1 if x.verdict is Verdict.PASS else 0)
        if x.gbps is not None and math.isfinite(x.gbps):
            gbps.labels(*who).set(x.gbps)
