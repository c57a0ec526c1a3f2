"""`chipcheck ingest PATH...`: merge the JSONL result shards of many nodes into the store.

Every rank of a distributed run keeps a JSONL copy of its own results (fleet.distributed), so a
run whose rank 0 died, or a store that lives elsewhere, can be rebuilt from the shards. Ingest is
idempotent: a result is identified by (run, rank, probe, case, start time), and one already in the
store (from rank 0 or an earlier ingest) is skipped. A run that gained results is judged again
over everything now stored, exactly as rank 0 would have judged it.

Shards come from other machines and are trusted for nothing: every line is checked field by field
(fleet.records) before it reaches the store. A bad line is skipped and named (`FILE:LINE: reason`),
the good lines of the same shard are kept, and a file that is not a text shard is skipped without
stopping the others.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..results import DeviceInfo, DeviceKind, ProbeResult
from . import records
from .session import RunSession
from .store import Store


class IngestError(ValueError):
    """A path that is neither a shard nor a folder of shards (one line, exit 2)."""


MAX_SHARD_BYTES = 1 << 30
"""A larger file is not a shard (a result line is a few kB; a rank writes a few thousand)."""
MAX_WARNINGS = 20
"""Warnings kept word for word; the rest are only counted."""


@dataclass(slots=True, kw_only=True)
class IngestReport:
    shards: int = 0
    added: int = 0
    duplicates: int = 0
    bad_lines: int = 0
    """Lines that are not a valid result (the half-written last line of a rank that died, a wrong
    type, a host name no scheduler accepts): skipped, the other lines of the shard kept."""
    bad_files: int = 0
    """Files that could not be read as text (binary, unreadable, too large): skipped."""
    runs: list[str] = field(default_factory=list)
    """Runs that gained results (and were judged again)."""
    warnings: list[str] = field(default_factory=list)
    """`FILE:LINE: reason` for the first `MAX_WARNINGS` bad lines and files."""

    def warn(self, text: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(text)

    @property
    def unshown(self) -> int:
        """Bad lines and files beyond those in `warnings`."""
        return self.bad_lines + self.bad_files - len(self.warnings)


def shard_paths(paths: list[str]) -> list[Path]:
    """Files as given, folders searched for *.jsonl; a path that does not exist is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.rglob("*.jsonl") if x.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise IngestError(f"{p}: no such shard or folder (expected the --local-dir of a distributed run)")
    return out


def read_shard(path: Path, rep: IngestReport | None = None) -> tuple[list[ProbeResult], int]:
    """The valid results in one shard, and how many lines were not valid results (each one
    warned about as `FILE:LINE: reason` in `rep`). A file that is not text raises ShardUnreadable."""
    rep = rep if rep is not None else IngestReport()
    try:
        if path.stat().st_size > MAX_SHARD_BYTES:
            raise ShardUnreadable(f"larger than {MAX_SHARD_BYTES >> 20} MiB: not a shard")
        data = path.read_bytes()
    except OSError as e:
        raise ShardUnreadable(f"cannot read ({e.strerror or e})") from None
    results, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            results.append(records.parse_line(raw.decode("utf-8")))
        except UnicodeDecodeError:
            problems.append(f"{path}:{number}: not UTF-8 text")
        except records.BadRecord as e:
            problems.append(f"{path}:{number}: {e}")
    # Binary: NUL bytes, not UTF-8, and not one record. A shard whose tail a crash left zero-filled
    # (NUL lines after the last complete record), or with a torn sector amid its records, is read:
    # its results are kept and the bad lines counted.
    if b"\0" in data and not results and not _utf8(data):
        raise ShardUnreadable("a binary file, not a JSONL shard")
    for why in problems:
        rep.warn(why)
    return results, len(problems)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ShardUnreadable(Exception):
    """A file that cannot be read as a shard at all (the reason); it is skipped, the rest are read."""


def device_from(r: ProbeResult) -> DeviceInfo:
    """A device as far as its results tell (shards carry no inventory: name and memory are unknown)."""
    kind, _, index = r.device.partition(":")
    return DeviceInfo(index=int(index) if index.isascii() and index.isdigit() and len(index) < 7 else r.rank,
                      kind=DeviceKind(kind) if kind in DeviceKind._value2member_map_ else DeviceKind.CPU,
                      name="(from shard)", memory_bytes=0, uuid=r.device_uuid or f"{r.host}-{r.device}",
                      host=r.host, fingerprint=r.fingerprint)


def ingest(store: Store, paths: list[str]) -> IngestReport:
    """Add every result of the shards not already stored; judge again the runs that gained results."""
    rep = IngestReport()
    by_run: dict[str, list[ProbeResult]] = defaultdict(list)
    for path in shard_paths(paths):
        try:
            results, bad = read_shard(path, rep)
        except ShardUnreadable as e:
            rep.bad_files += 1
            rep.warn(f"{path}: skipped: {e}")
            continue
        rep.shards += 1
        rep.bad_lines += bad
        for r in results:
            by_run[r.run_id].append(r)
    store.spool_unsaved = False  # the shards are the copy: a failed write stops here, ingest again later
    known = {run.run_id for run in store.runs()}
    for run_id, results in sorted(by_run.items()):
        run = RunSession(store, run_id)
        if run_id not in known:
            first = min(results, key=lambda r: (r.rank, r.started))
            run.begin(host=first.host, profile="unknown", seed=first.seed, argv=["chipcheck", "ingest"],
                      config={"launcher": "ingest"}, started=min(r.started for r in results))
        have = store.devices(run_id)
        new_devs = {r.rank: device_from(r) for r in results if r.rank not in have}
        if new_devs:
            run.add_devices(sorted(new_devs.items()))
        for r in results:
            if not run.keep_new(r):
                rep.duplicates += 1
        if run.results:
            rep.added += len(run.results)
            rep.runs.append(run_id)
            _judge(run)
    return rep


def _judge(run: RunSession) -> None:
    """Judge a run over everything stored for it, replacing earlier judgements."""
    from . import reload, runner

    store, run_id = run.store, run.run_id
    rec = reload.record(store, run_id)
    row = store.run(run_id)
    options = dict(row.config.get("options") or {}) if row else {}
    options.pop("declared", None)  # a topology file on the node that ran it need not exist here
    opts = runner.RunOptions(profile=rec.profile if rec.profile in runner.PROFILES else "quick", seed=rec.seed,
                             min_gap=rec.min_gap, options={k: str(v) for k, v in options.items()})
    devices = store.devices(run_id)
    run.finish(lambda results: runner.judge(run_id, devices, results, opts, rec.started, store),
               store.results(run_id), again=True)
