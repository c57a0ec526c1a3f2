"""`chipcheck ingest PATH...`: merge the JSONL result shards of many nodes into the store.

Every rank of a distributed run keeps a JSONL copy of its own results (fleet.distributed), so a
run whose rank 0 died, or a store that lives elsewhere, can be rebuilt from the shards. Ingest is
idempotent: a result is identified by (run, rank, probe, case, start time), and one already in the
store (from rank 0 or an earlier ingest) is skipped. A run that gained results is judged again
over everything now stored, exactly as rank 0 would have judged it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..results import DeviceInfo, DeviceKind, ProbeResult
from .store import Store


class IngestError(ValueError):
    """A path that is neither a shard nor a folder of shards (one line, exit 2)."""


@dataclass(slots=True, kw_only=True)
class IngestReport:
    shards: int = 0
    added: int = 0
    duplicates: int = 0
    bad_lines: int = 0
    """Lines that are not a result (e.g. the half-written last line of a rank that died)."""
    runs: list[str] = field(default_factory=list)
    """Runs that gained results (and were judged again)."""


def shard_paths(paths: list[str]) -> list[Path]:
    """Files as given, folders searched for *.jsonl; a path that does not exist is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.rglob("*.jsonl"))
        elif p.is_file():
            out.append(p)
        else:
            raise IngestError(f"{p}: no such shard or folder (expected the --local-dir of a distributed run)")
    return out


def read_shard(path: Path) -> tuple[list[ProbeResult], int]:
    """The results in one shard, and how many lines were not results."""
    results, bad = [], 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: cannot read ({e})") from None
    for line in lines:
        if not line.strip():
            continue
        try:
            results.append(ProbeResult.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            bad += 1
    return results, bad


def device_from(r: ProbeResult) -> DeviceInfo:
    """A device as far as its results tell (shards carry no inventory: name and memory are unknown)."""
    kind, _, index = r.device.partition(":")
    return DeviceInfo(index=int(index) if index.isdigit() else r.rank,
                      kind=DeviceKind(kind) if kind in DeviceKind._value2member_map_ else DeviceKind.CPU,
                      name="(from shard)", memory_bytes=0, uuid=r.device_uuid or f"{r.host}-{r.device}",
                      host=r.host, fingerprint=r.fingerprint)


def ingest(store: Store, paths: list[str]) -> IngestReport:
    """Add every result of the shards not already stored; judge again the runs that gained results."""
    rep = IngestReport()
    by_run: dict[str, list[ProbeResult]] = defaultdict(list)
    for path in shard_paths(paths):
        results, bad = read_shard(path)
        rep.shards += 1
        rep.bad_lines += bad
        for r in results:
            by_run[r.run_id].append(r)
    known = {run_id for run_id, _, _ in store.runs()}
    for run_id, results in sorted(by_run.items()):
        if run_id not in known:
            first = min(results, key=lambda r: (r.rank, r.started))
            store.begin_run(run_id, host=first.host, profile="unknown", seed=first.seed, argv=["chipcheck", "ingest"],
                            config={"launcher": "ingest"}, started=min(r.started for r in results))
        have = store.devices(run_id)
        new_devs = {r.rank: device_from(r) for r in results if r.rank not in have}
        if new_devs:
            store.add_devices(run_id, sorted(new_devs.items()))
        added = 0
        for r in results:
            if store.has_result(r):
                rep.duplicates += 1
                continue
            store.add_result(r)
            added += 1
        if added:
            rep.added += added
            rep.runs.append(run_id)
            _judge(store, run_id)
    return rep


def _judge(store: Store, run_id: str) -> None:
    """Judge a run over everything stored for it, replacing earlier judgements."""
    from . import reload, runner

    rec = reload.record(store, run_id)
    row = store.conn.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
    options = json.loads(row[0]).get("options", {}) if row else {}
    options.pop("declared", None)  # a topology file on the node that ran it need not exist here
    opts = runner.RunOptions(profile=rec.profile if rec.profile in runner.PROFILES else "quick", seed=rec.seed,
                             min_gap=rec.min_gap, options={k: str(v) for k, v in options.items()})
    devices = store.devices(run_id)
    summary, judgements = runner.judge(run_id, devices, store.results(run_id), opts, rec.started)
    store.clear_judgements(run_id)
    store.add_judgements(run_id, judgements)
    if summary.links is not None:
        store.add_links(run_id, summary.links)
    store.end_run(run_id, summary.verdict)
