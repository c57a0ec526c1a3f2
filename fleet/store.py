"""The results store: one SQLite file (WAL), written as results arrive.

Every result is committed the moment it is produced, so killing a run loses nothing already
measured. Runs are never overwritten: history and trends read across them.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..results import (
    DeviceInfo,
    Judgement,
    LinksSummary,
    ProbeResult,
    Verdict,
    links_from_dict,
    links_to_dict,
)
from . import records
from . import store_file as sf
from .store_file import APPLICATION_ID, StoreError, default_path

__all__ = ["APPLICATION_ID", "DeviceRun", "LinkRow", "RunRow", "Store", "StoreError", "StoredRun", "default_path"]


class Store:
    """One results database: which files it accepts and how it is opened or built, fleet/store_file.py
    (`readonly=True`: SQLite `mode=ro`, the file is never written; derived tables go to TEMP).

    A write that fails once the store is open (the disk filled up, the database is locked past
    the timeout) does not stop a run: the results that could not be written go to an "unsaved"
    JSONL file in the shard format (beside the store, else in the temporary directory) and
    `end_run` raises `StoreError` naming it, so `chipcheck ingest FILE` restores them later.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.spool_unsaved = True
        """Keep results a failed write could not store in an unsaved JSONL file (False: raise at once)."""
        self.failure: str | None = None
        """The first write that failed (the store is not written after it)."""
        self.unsaved = 0
        """Results kept in `spool` instead of the store."""
        self.lost = 0
        """Results that could not be kept anywhere (no space for the unsaved file either)."""
        self.spool: Path | None = None
        self.skipped_rows = 0
        """Stored rows that could not be decoded and were left out of what the reads return."""
        self._scratch = False
        self._scratch_rules: dict[str, int] = {}  # a read-only store's derived rules, on this connection
        self.conn = sf.open_readonly(self.path) if readonly else sf.open_writable(self.path)

    def close(self) -> None:
        self.conn.close()

    # ---- writes: each one its own committed transaction ----------------------------------

    def _write(self, what: str, fn: Callable[[], object], keep: Iterable[ProbeResult] = ()) -> None:
        """Run one write; when it fails, remember why and keep `keep` in the unsaved file."""
        if self.readonly:
            raise StoreError(f"--db {self.path} was opened read-only; cannot write {what}")
        if self.failure is None:
            try:
                fn()
                return
            except sqlite3.Error as e:
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                self.failure = sf.write_message(self.path, what, e)
                if not self.spool_unsaved:
                    raise StoreError(self.failure) from None
        for r in keep:
            self._keep(r)

    def _keep(self, r: ProbeResult) -> None:
        """Append one result to the unsaved JSONL file (beside the store, else in the temp directory)."""
        line = (r.to_json() + "\n").encode()
        name = f"{self.path.name}.unsaved-{r.run_id}.jsonl"
        places = [self.spool] if self.spool else [self.path.parent / name, Path(tempfile.gettempdir()) / name]
        for place in places:
            new = not place.exists()
            try:
                fd = os.open(place, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    if os.write(fd, line) != len(line):
                        raise OSError(errno.ENOSPC, "short write")
                finally:
                    os.close(fd)
            except OSError:
                if new:  # a full disk takes the name but not the line: leave no empty file behind
                    place.unlink(missing_ok=True)
                continue
            self.spool = place
            self.unsaved += 1
            return
        self.lost += 1

    def failure_message(self) -> str | None:
        """One line for the user when a write failed: why, and where the results that were not stored are."""
        if self.failure is None:
            return None
        msg = self.failure
        if self.unsaved:
            msg += (f"; {self.unsaved} results that could not be stored are in {self.spool} (after freeing space: "
                    f"chipcheck ingest {self.spool} --db {self.path})")
        if self.lost:
            msg += f"; {self.lost} results could not be kept anywhere (no space for an unsaved file either)"
        if not self.unsaved and not self.lost:
            msg += "; every result measured before it is stored"
        return msg

    def begin_run(self, run_id: str, *, host: str, profile: str, seed: int, argv: list[str],
                  config: dict[str, Any], started: float | None = None) -> None:
        """Record a new run. Raises StoreError when the store cannot take it: nothing was measured yet."""
        self._write("the run", lambda: self.conn.execute(
            "INSERT INTO runs (run_id, started, host, profile, seed, argv, config, status) VALUES (?,?,?,?,?,?,?,?)",
            (run_id, time.time() if started is None else started, host, profile, seed, json.dumps(argv),
             json.dumps(config, sort_keys=True), "running")))
        if self.failure is not None:
            raise StoreError(self.failure)

    def add_devices(self, run_id: str, ranked: Iterable[tuple[int, DeviceInfo]]) -> None:
        rows = [(run_id, r, d.label, d.host, d.uuid, d.fingerprint, json.dumps(d.to_dict())) for r, d in ranked]
        self._write("the devices", lambda: self._many("INSERT OR REPLACE INTO devices VALUES (?,?,?,?,?,?,?)", rows))

    def add_result(self, r: ProbeResult) -> None:
        self._write(f"a result ({r.probe} {r.case} rank {r.rank})", lambda: self.conn.execute(
            "INSERT INTO results (run_id, rank, host, device, device_uuid, fingerprint, probe, case_name, verdict,"
            " output_hash, started, ended, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.run_id, r.rank, r.host, r.device, r.device_uuid, r.fingerprint, r.probe, r.case, r.verdict.value,
             r.output_hash, r.started, r.ended, r.to_json())), keep=(r,))

    def add_judgements(self, run_id: str, js: Iterable[Judgement]) -> None:
        rows = [(run_id, j.rank, j.probe, j.case, j.verdict.value, j.reason, json.dumps(j.metrics)) for j in js]
        self._write("the judgements", lambda: self._many("INSERT INTO judgements VALUES (?,?,?,?,?,?,?)", rows))

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(sql, rows)

    def add_links(self, run_id: str, links: LinksSummary) -> None:
        """The judged link matrix: a row per direction, and the whole sweep (matrices, topology)."""
        def write() -> None:
            with self.conn:
                self.conn.execute("BEGIN")
                self.conn.executemany(
                    "INSERT OR REPLACE INTO links VALUES (?,?,?,?,?,?,?,?)",
                    [(run_id, x.src, x.dst, x.verdict.value, x.latency_us, x.gbps, x.bad_bytes, x.reason)
                     for x in links.links])
                self.conn.execute("INSERT OR REPLACE INTO link_sweeps VALUES (?,?)",
                                  (run_id, json.dumps(links_to_dict(links))))
        self._write("the links", write)

    def links(self, run_id: str) -> LinksSummary | None:
        row = self.conn.execute("SELECT body FROM link_sweeps WHERE run_id=?", (run_id,)).fetchone()
        if not row:
            return None
        try:
            return links_from_dict(json.loads(row[0]))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.skipped_rows += 1
            return None

    def end_run(self, run_id: str, verdict: Verdict) -> None:
        """Record the run's verdict. Raises StoreError when any write of this store failed (the run is
        over: its results are in the store or in the unsaved file that the message names)."""
        self._write("the verdict", lambda: self.conn.execute(
            "UPDATE runs SET ended=?, verdict=?, status=? WHERE run_id=?",
            (time.time(), verdict.value, "complete", run_id)))
        msg = self.failure_message()
        if msg is not None:
            raise StoreError(msg)

    def interrupt_run(self, run_id: str) -> None:
        """Mark a run that was cut short `interrupted` (no verdict: reports judge what it measured and
        say it is incomplete). Never raises: the run is already on its way out."""
        if self.readonly or self.failure is not None:
            return
        try:
            self.conn.execute("UPDATE runs SET ended=?, status=? WHERE run_id=? AND verdict IS NULL",
                              (time.time(), "interrupted", run_id))
        except sqlite3.Error:
            pass

    def run_status(self, run_id: str) -> str | None:
        """The stored status of a run (`running`, `complete`, `interrupted`); None from an older store."""
        if not sf.has_column(self.conn, "runs", "status"):
            return None
        row = self.conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def has_result(self, r: ProbeResult) -> bool:
        """Whether this exact result (run, rank, probe, case, start time) is stored: ingest's idempotence key."""
        return self.conn.execute(
            "SELECT 1 FROM results WHERE run_id=? AND rank=? AND probe=? AND case_name=? AND started=? LIMIT 1",
            (r.run_id, r.rank, r.probe, r.case, r.started)).fetchone() is not None

    def clear_judgements(self, run_id: str) -> None:
        """Forget a run's fleet judgements (and what derives from them) before it is judged again."""
        def write() -> None:
            with self.conn:
                self.conn.execute("BEGIN")
                for table in ("judgements", "links", "link_sweeps", "device_runs"):
                    self.conn.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
        self._write("the judgements", write)

    def add_device_runs(self, runs: Iterable[DeviceRun]) -> None:
        """fleet.history's per-device rows of one judged run (see the device_runs table). A read-only
        store keeps them in a TEMP table for this connection: the file is not written."""
        rows = [r.row() for r in runs]
        if self.readonly:
            self._scratch_device_runs()
            self.conn.executemany("INSERT OR REPLACE INTO temp.device_runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            return
        self._write("the history index", lambda: self._many(
            "INSERT OR REPLACE INTO device_runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows))

    def _scratch_device_runs(self, *, copy: bool = True) -> None:
        """A TEMP device_runs (it hides main.device_runs on this connection) holding what main has
        (`copy`), or nothing (main's rows follow an older rule)."""
        if self._scratch:
            if not copy:
                self.conn.execute("DELETE FROM temp.device_runs")
            return
        self.conn.execute(f"CREATE TEMP TABLE device_runs ({sf.DEVICE_RUNS_COLUMNS})")
        if copy and self.conn.execute("SELECT 1 FROM main.sqlite_master WHERE name='device_runs'").fetchone():
            self.conn.execute("INSERT INTO temp.device_runs SELECT * FROM main.device_runs")
        self._scratch = True

    def derived_rule(self, name: str) -> int:
        """The rule the derived table `name`'s rows were built by (0: before rules were recorded)."""
        if name in self._scratch_rules:
            return self._scratch_rules[name]
        try:
            row = self.conn.execute("SELECT rule FROM derived WHERE name=?", (name,)).fetchone()
        except sqlite3.OperationalError:  # a read-only store from before the table
            return 0
        return int(row[0]) if row else 0

    def rebuild_device_runs(self, rule: int) -> None:
        """Drop every device_runs row (built by an older rule); the next ones follow `rule`. A read-only
        store does so in its TEMP table only."""
        if self.readonly:
            self._scratch_device_runs(copy=False)
            self._scratch_rules["device_runs"] = rule
            return

        def write() -> None:
            with self.conn:
                self.conn.execute("BEGIN")
                self.conn.execute("DELETE FROM device_runs")
                self.conn.execute("INSERT OR REPLACE INTO derived VALUES ('device_runs', ?)", (rule,))
        self._write("the history index", write)

    def device_runs(self, *, uuid: str | None = None, host: str | None = None) -> list[DeviceRun]:
        """device_runs rows (all, or one device's, or one host's), oldest run first."""
        where, args = ("WHERE uuid=?", (uuid,)) if uuid else ("WHERE host=?", (host,)) if host else ("", ())
        return [DeviceRun.from_row(r)
                for r in self.conn.execute(f"SELECT * FROM device_runs {where} ORDER BY started, rank", args)]

    def link_rows(self) -> list[LinkRow]:
        """Every judged link direction of every run, endpoints named by host and device, oldest run first."""
        return [LinkRow(run_id=str(run_id), started=float(started), src_host=str(sh), src_device=str(sd),
                        dst_host=str(dh), dst_device=str(dd), gbps=None if gbps is None else float(gbps),
                        verdict=str(verdict))
                for run_id, started, sh, sd, dh, dd, gbps, verdict in self.conn.execute(
            "SELECT l.run_id, r.started, s.host, s.device, d.host, d.device, l.gbps, l.verdict FROM links l"
            " JOIN runs r ON r.run_id = l.run_id"
            " JOIN devices s ON s.run_id = l.run_id AND s.rank = l.src"
            " JOIN devices d ON d.run_id = l.run_id AND d.rank = l.dst ORDER BY r.started")]

    def indexed_runs(self) -> set[str]:
        if self.readonly:
            self._scratch_device_runs()
        return {r for (r,) in self.conn.execute("SELECT DISTINCT run_id FROM device_runs")}

    # ---- reads ---------------------------------------------------------------------------

    def results(self, run_id: str) -> list[ProbeResult]:
        """The run's results in arrival order; a stored body that is not a valid result (a store
        poisoned by an older ingest) is skipped and counted in `skipped_rows`, never raised."""
        out = []
        for (body,) in self.conn.execute("SELECT body FROM results WHERE run_id=? ORDER BY id", (run_id,)):
            try:
                out.append(records.parse_line(body))
            except (records.BadRecord, TypeError):
                self.skipped_rows += 1
        return out

    def judgements(self, run_id: str) -> list[Judgement]:
        rows = self.conn.execute(
            "SELECT rank, probe, case_name, verdict, reason, metrics FROM judgements WHERE run_id=?", (run_id,))
        out = []
        for r, p, c, v, why, m in rows:
            try:
                metrics = records.check_metrics(json.loads(m))
                verdict = Verdict(v)
                if not isinstance(r, int):
                    raise TypeError(r)
            except (ValueError, TypeError, RecursionError):  # records.BadRecord is a ValueError
                self.skipped_rows += 1
                continue
            out.append(Judgement(rank=r, probe=str(p), case=str(c), verdict=verdict, reason=str(why),
                                 metrics=metrics))
        return out

    def devices(self, run_id: str) -> dict[int, DeviceInfo]:
        rows = self.conn.execute("SELECT rank, info FROM devices WHERE run_id=? ORDER BY rank", (run_id,))
        out = {}
        for r, info in rows:
            try:
                out[r] = DeviceInfo.from_dict(json.loads(info))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                self.skipped_rows += 1
        return out

    def run(self, run_id: str) -> StoredRun | None:
        """The run's row (None: no such run)."""
        row = self.conn.execute("SELECT run_id, started, ended, host, profile, seed, config FROM runs WHERE run_id=?",
                                (run_id,)).fetchone()
        if row is None:
            return None
        try:
            config = json.loads(row[6])
        except (TypeError, ValueError, RecursionError):
            config = {}
        return StoredRun(run_id=str(row[0]), started=float(row[1]), ended=None if row[2] is None else float(row[2]),
                         host=str(row[3]), profile=str(row[4]), seed=int(row[5]),
                         config=config if isinstance(config, dict) else {})

    def device_results(self, uuid: str, probe: str, *, since: float, until: float) -> list[ProbeResult]:
        """One device's (by UUID) results of one probe that started in [since, until], in arrival
        order (through the results table's device_uuid index); unreadable bodies are skipped and
        counted in `skipped_rows`, as in `results`."""
        out = []
        for (body,) in self.conn.execute(
                "SELECT body FROM results WHERE device_uuid=? AND probe=? AND started>=? AND started<=? ORDER BY id",
                (uuid, probe, since, until)):
            try:
                out.append(records.parse_line(body))
            except (records.BadRecord, TypeError):
                self.skipped_rows += 1
        return out

    def runs(self) -> list[RunRow]:
        """Every run, oldest first."""
        return [RunRow(run_id=str(r), started=float(s), verdict=None if v is None else str(v))
                for r, s, v in self.conn.execute("SELECT run_id, started, verdict FROM runs ORDER BY started")]

    def latest_run(self) -> str | None:
        row = self.conn.execute("SELECT run_id FROM runs ORDER BY started DESC LIMIT 1").fetchone()
        return row[0] if row else None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRow:
    """One run as a list of runs shows it: its verdict is None until it ends (or when it was cut short)."""

    run_id: str
    started: float
    verdict: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredRun:
    """One run's row: when and where it ran, how, and the options it was run with (`config`, parsed;
    {} when the stored text is not a JSON object)."""

    run_id: str
    started: float
    ended: float | None
    host: str
    profile: str
    seed: int
    config: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRun:
    """One device in one judged run."""

    run_id: str
    rank: int
    uuid: str
    host: str
    device: str
    fingerprint: str
    started: float
    verdict: Verdict
    speed_ratio: float | None
    """Median over its cases of (its speed / the median speed of its fingerprint group); None alone."""
    wrong: bool
    flaky: bool

    def row(self) -> tuple[object, ...]:
        """The device_runs table's columns, in order."""
        return (self.run_id, self.rank, self.uuid, self.host, self.device, self.fingerprint, self.started,
                self.verdict.value, self.speed_ratio, int(self.wrong), int(self.flaky))

    @classmethod
    def from_row(cls, r: sqlite3.Row | tuple[Any, ...]) -> DeviceRun:
        run_id, rank, uuid, host, device, fp, started, verdict, ratio, wrong, flaky = r
        return cls(run_id=str(run_id), rank=int(rank), uuid=str(uuid), host=str(host), device=str(device),
                   fingerprint=str(fp), started=float(started), verdict=Verdict(verdict),
                   speed_ratio=None if ratio is None else float(ratio), wrong=bool(wrong), flaky=bool(flaky))


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkRow:
    """One judged link direction of one run, its ends named by host and device."""

    run_id: str
    started: float
    src_host: str
    src_device: str
    dst_host: str
    dst_device: str
    gbps: float | None
    verdict: str

    @property
    def ends(self) -> tuple[str, str, str, str]:
        return self.src_host, self.src_device, self.dst_host, self.dst_device
