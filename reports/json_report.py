"""The run as versioned JSON (`chipcheck.run/1`): the machine-readable verdict for automation."""

from __future__ import annotations

import json
from typing import Any

from .. import failures
from ..results import ProbeSummary, RunSummary

SCHEMA = "chipcheck.run/1"


def to_dict(s: RunSummary) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "run_id": s.run_id,
        "verdict": s.verdict.value,
        "profile": s.profile,
        "seed": s.seed,
        "started": s.started,
        "ended": s.ended,
        **({"status": s.status.value, "missing": s.missing} if s.status.value != "complete" else {}),
        "devices": [
            {
                "rank": d.rank,
                "device": d.device,
                "host": d.host,
                "uuid": d.uuid,
                "fingerprint": d.fingerprint,
                "verdict": d.verdict.value,
                "probes": [
                    {"probe": p.probe, "verdict": p.verdict.value, "metrics": p.metrics, "details": p.details(),
                     **_code(p)}
                    for p in d.probes
                ],
            }
            for d in s.devices
        ],
        "consensus": [g.to_dict() for g in s.groups],
        **(_links(s) if s.links is not None else {}),
        **({"findings": s.findings} if s.findings else {}),
        "summary": {
            "devices": len(s.devices),
            "failed": len(s.failed),
            "failed_fraction": len(s.failed) / len(s.devices) if s.devices else 0.0,
            "suspect": len(s.suspect),
            "by_verdict": _count(s),
        },
    }


def _code(p: ProbeSummary) -> dict[str, Any]:
    """`failure_code` (code, severity, action) for a failing probe, so automation can act on it."""
    code = failures.for_probe(p)
    return {"failure_code": code.to_dict()} if code else {}


def _links(s: RunSummary) -> dict[str, Any]:
    assert s.links is not None
    x = s.links
    return {
        "links": [link.to_dict() for link in x.links],
        "link_matrices": {"latency_us": x.latency_us, "gbps": x.gbps, "bad_bytes": x.bad_bytes},
        "link_sweep": {"pairing": x.pairing, "rounds": x.rounds, "failed": len(x.failed)},
        "topology": {"levels": x.topology_levels, "groups": x.topology_groups, "disagreements": x.disagreements},
    }


def _count(s: RunSummary) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in s.devices:
        out[d.verdict.value] = out.get(d.verdict.value, 0) + 1
    return out


def render(s: RunSummary) -> str:
    # NaN/inf (a NaN the chip produced) are written as strings: JSON has no NaN
    return json.dumps(_finite(to_dict(s)), indent=2, sort_keys=False)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
