"""The results store: one SQLite file (WAL), written as results arrive.

Every result is committed the moment it is produced, so killing a run loses nothing already
measured. Runs are never overwritten: history and trends read across them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
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

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,
    host TEXT NOT NULL,
    profile TEXT NOT NULL,
    seed INTEGER NOT NULL,
    argv TEXT NOT NULL,
    config TEXT NOT NULL,
    verdict TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    rank INTEGER NOT NULL,
    device TEXT NOT NULL,
    host TEXT NOT NULL,
    uuid TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    info TEXT NOT NULL,
    PRIMARY KEY (run_id, rank)
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    rank INTEGER NOT NULL,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    device_uuid TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    probe TEXT NOT NULL,
    case_name TEXT NOT NULL,
    verdict TEXT NOT NULL,
    output_hash TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_run ON results(run_id, rank);
CREATE INDEX IF NOT EXISTS results_uuid ON results(device_uuid);
CREATE TABLE IF NOT EXISTS judgements (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    rank INTEGER NOT NULL,
    probe TEXT NOT NULL,
    case_name TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS judgements_run ON judgements(run_id);
CREATE TABLE IF NOT EXISTS links (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    src INTEGER NOT NULL,
    dst INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    latency_us REAL,
    gbps REAL,
    bad_bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (run_id, src, dst)
);
CREATE TABLE IF NOT EXISTS link_sweeps (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_key ON results(run_id, rank, probe, case_name);
-- One row per device per judged run, derived from results + judgements (fleet.history):
-- history and trends read this compact table instead of re-parsing every result body.
CREATE TABLE IF NOT EXISTS device_runs (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    rank INTEGER NOT NULL,
    uuid TEXT NOT NULL,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    started REAL NOT NULL,
    verdict TEXT NOT NULL,
    speed_ratio REAL,
    wrong INTEGER NOT NULL,
    flaky INTEGER NOT NULL,
    PRIMARY KEY (run_id, rank)
);
CREATE INDEX IF NOT EXISTS device_runs_uuid ON device_runs(uuid);
CREATE INDEX IF NOT EXISTS device_runs_host ON device_runs(host);
"""


class StoreError(Exception):
    """The database cannot be used (unwritable, corrupt, from a newer chipcheck): exit 2."""


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "chipcheck" / "results.db"


class Store:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the directory for --db {self.path}: {e.strerror}") from None
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(f"--db {self.path} is not writable")
        if not os.access(self.path.parent, os.W_OK):
            raise StoreError(f"--db {self.path}: directory {self.path.parent} is not writable")
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"--db {self.path} was written by a newer chipcheck (schema {version})")
            ok = self.conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"--db {self.path} is corrupt ({ok}); move it aside or pass another --db")
            self.conn.executescript(_SCHEMA)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"--db {self.path} is not a usable chipcheck database ({e}); "
                             f"move it aside or pass another --db") from None

    def close(self) -> None:
        self.conn.close()

    # ---- writes: each one its own committed transaction ----------------------------------

    def begin_run(self, run_id: str, *, host: str, profile: str, seed: int, argv: list[str],
                  config: dict[str, Any], started: float | None = None) -> None:
        self.conn.execute(
            "INSERT INTO runs (run_id, started, host, profile, seed, argv, config) VALUES (?,?,?,?,?,?,?)",
            (run_id, time.time() if started is None else started, host, profile, seed, json.dumps(argv), json.dumps(config, sort_keys=True)),
        )

    def add_devices(self, run_id: str, ranked: Iterable[tuple[int, DeviceInfo]]) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR REPLACE INTO devices VALUES (?,?,?,?,?,?,?)",
                [(run_id, r, d.label, d.host, d.uuid, d.fingerprint, json.dumps(d.to_dict())) for r, d in ranked],
            )

    def add_result(self, r: ProbeResult) -> None:
        self.conn.execute(
            "INSERT INTO results (run_id, rank, host, device, device_uuid, fingerprint, probe, case_name, verdict,"
            " output_hash, started, ended, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.run_id, r.rank, r.host, r.device, r.device_uuid, r.fingerprint, r.probe, r.case, r.verdict.value,
             r.output_hash, r.started, r.ended, r.to_json()),
        )

    def add_judgements(self, run_id: str, js: Iterable[Judgement]) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT INTO judgements VALUES (?,?,?,?,?,?,?)",
                [(run_id, j.rank, j.probe, j.case, j.verdict.value, j.reason, json.dumps(j.metrics)) for j in js],
            )

    def add_links(self, run_id: str, links: LinksSummary) -> None:
        """The judged link matrix: a row per direction, and the whole sweep (matrices, topology)."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR REPLACE INTO links VALUES (?,?,?,?,?,?,?,?)",
                [(run_id, x.src, x.dst, x.verdict.value, x.latency_us, x.gbps, x.bad_bytes, x.reason)
                 for x in links.links])
            self.conn.execute("INSERT OR REPLACE INTO link_sweeps VALUES (?,?)",
                              (run_id, json.dumps(links_to_dict(links))))

    def links(self, run_id: str) -> LinksSummary | None:
        row = self.conn.execute("SELECT body FROM link_sweeps WHERE run_id=?", (run_id,)).fetchone()
        return links_from_dict(json.loads(row[0])) if row else None

    def end_run(self, run_id: str, verdict: Verdict) -> None:
        self.conn.execute("UPDATE runs SET ended=?, verdict=? WHERE run_id=?", (time.time(), verdict.value, run_id))

    def has_result(self, r: ProbeResult) -> bool:
        """Whether this exact result (run, rank, probe, case, start time) is stored: ingest's idempotence key."""
        return self.conn.execute(
            "SELECT 1 FROM results WHERE run_id=? AND rank=? AND probe=? AND case_name=? AND started=? LIMIT 1",
            (r.run_id, r.rank, r.probe, r.case, r.started)).fetchone() is not None

    def clear_judgements(self, run_id: str) -> None:
        """Forget a run's fleet judgements (and what derives from them) before it is judged again."""
        with self.conn:
            self.conn.execute("BEGIN")
            for table in ("judgements", "links", "link_sweeps", "device_runs"):
                self.conn.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))

    def add_device_runs(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """fleet.history's per-device rows of one judged run (see the device_runs table)."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT OR REPLACE INTO device_runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)

    def device_runs(self, *, uuid: str | None = None, host: str | None = None) -> list[tuple[Any, ...]]:
        """device_runs rows (all, or one device's, or one host's), oldest run first."""
        where, args = ("WHERE uuid=?", (uuid,)) if uuid else ("WHERE host=?", (host,)) if host else ("", ())
        return list(self.conn.execute(f"SELECT * FROM device_runs {where} ORDER BY started, rank", args))

    def link_rows(self) -> list[tuple[Any, ...]]:
        """Every judged link direction of every run, endpoints named by host and device:
        (run_id, started, src_host, src_device, dst_host, dst_device, gbps, verdict), oldest run first."""
        return list(self.conn.execute(
            "SELECT l.run_id, r.started, s.host, s.device, d.host, d.device, l.gbps, l.verdict FROM links l"
            " JOIN runs r ON r.run_id = l.run_id"
            " JOIN devices s ON s.run_id = l.run_id AND s.rank = l.src"
            " JOIN devices d ON d.run_id = l.run_id AND d.rank = l.dst ORDER BY r.started"))

    def indexed_runs(self) -> set[str]:
        return {r for (r,) in self.conn.execute("SELECT DISTINCT run_id FROM device_runs")}

    # ---- reads ---------------------------------------------------------------------------

    def results(self, run_id: str) -> list[ProbeResult]:
        rows = self.conn.execute("SELECT body FROM results WHERE run_id=? ORDER BY id", (run_id,))
        return [ProbeResult.from_dict(json.loads(b)) for (b,) in rows]

    def judgements(self, run_id: str) -> list[Judgement]:
        rows = self.conn.execute(
            "SELECT rank, probe, case_name, verdict, reason, metrics FROM judgements WHERE run_id=?", (run_id,))
        return [Judgement(rank=r, probe=p, case=c, verdict=Verdict(v), reason=why, metrics=json.loads(m))
                for r, p, c, v, why, m in rows]

    def devices(self, run_id: str) -> dict[int, DeviceInfo]:
        rows = self.conn.execute("SELECT rank, info FROM devices WHERE run_id=? ORDER BY rank", (run_id,))
        return {r: DeviceInfo.from_dict(json.loads(i)) for r, i in rows}

    def runs(self) -> list[tuple[str, float, str | None]]:
        return list(self.conn.execute("SELECT run_id, started, verdict FROM runs ORDER BY started"))

    def latest_run(self) -> str | None:
        row = self.conn.execute("SELECT run_id FROM runs ORDER BY started DESC LIMIT 1").fetchone()
        return row[0] if row else None
