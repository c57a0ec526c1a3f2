"""Which files the results store accepts, and how one is opened or built (fleet/store.py reads and
writes it).

- a path that does not exist: a new store is built in a temporary file beside it and linked into
  place only when complete, so a failure (a full disk) leaves no file behind;
- a chipcheck store (application id `APPLICATION_ID`, or a store from before the id was set:
  user_version >= 1 and only chipcheck's tables), opened read-write, or read-only (SQLite `mode=ro`:
  the file is never written);
- anything else is refused with one line (`StoreError`) and left byte-for-byte unchanged: a file that
  is not SQLite, another application's database, an empty SQLite database, and a 0-byte file (which
  may be another program's placeholder: chipcheck never leaves one itself).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1

DEVICE_RUNS_COLUMNS = ("run_id TEXT NOT NULL, rank INTEGER NOT NULL, uuid TEXT NOT NULL, host TEXT NOT NULL, "
                       "device TEXT NOT NULL, fingerprint TEXT NOT NULL, started REAL NOT NULL, "
                       "verdict TEXT NOT NULL, speed_ratio REAL, wrong INTEGER NOT NULL, flaky INTEGER NOT NULL, "
                       "PRIMARY KEY (run_id, rank)")
"""The device_runs table's columns: its schema below and a read-only store's TEMP copy of it (Store), one
definition so that `INSERT INTO temp.device_runs SELECT * FROM main.device_runs` lines up."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,
    host TEXT NOT NULL,
    profile TEXT NOT NULL,
    seed INTEGER NOT NULL,
    argv TEXT NOT NULL,
    config TEXT NOT NULL,
    verdict TEXT,
    status TEXT
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
    __DEVICE_RUNS_COLUMNS__,
    FOREIGN KEY (run_id) REFERENCES runs(run_id)
);
CREATE INDEX IF NOT EXISTS device_runs_uuid ON device_runs(uuid);
CREATE INDEX IF NOT EXISTS device_runs_host ON device_runs(host);
-- Which rule each derived table's rows were built by: rows of an older rule are built again.
CREATE TABLE IF NOT EXISTS derived (name TEXT PRIMARY KEY, rule INTEGER NOT NULL);
""".replace("__DEVICE_RUNS_COLUMNS__", DEVICE_RUNS_COLUMNS)


class StoreError(Exception):
    """The database cannot be used (unwritable, full, corrupt, another application's, from a newer
    chipcheck): one line for the user, exit 2."""


APPLICATION_ID = 0x63686970
"""`PRAGMA application_id` of every chipcheck store ("chip"): chipcheck writes only to files that carry it."""
OUR_TABLES = frozenset({"runs", "devices", "results", "judgements", "links", "link_sweeps", "device_runs",
                         "derived", "sqlite_sequence"})


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "chipcheck" / "results.db"


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to the chipcheck store at `path` (StoreError when it is none)."""
    if not path.is_file():
        raise StoreError(f"no results store at {path}; run `chipcheck run` first or pass --db")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA application_id").fetchone()
    except sqlite3.OperationalError as e:
        # A WAL store needs its -shm index even to read; on a full disk it cannot be made. When
        # no -wal holds unmerged pages, the main file alone is the whole store: read it as is.
        wal = Path(f"{path}-wal")
        if not disk_full(path) or (wal.exists() and wal.stat().st_size > 0):
            raise StoreError(f"--db {path} cannot be opened read-only ({why(path, e)})") from None
        conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
    except sqlite3.DatabaseError:  # not a database at all: _check_ours says so
        conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
    try:
        check_ours(path, conn)
    except BaseException:
        conn.close()
        raise
    return conn

def open_writable(path: Path) -> sqlite3.Connection:
    """A read-write connection to the chipcheck store at `path`, built there first when no file is;
    a store from before the application id or a newer table is brought up to date."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the directory for --db {path}: {e.strerror}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise StoreError(f"--db {path} is not writable")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"--db {path}: directory {path.parent} is not writable")
    if not path.exists():
        create(path)
    # look before writing anything: another application's file must stay byte-for-byte as it is
    open_readonly(path).close()
    try:
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"--db {path} cannot be opened ({e})") from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        if app != APPLICATION_ID or not OUR_TABLES - {"sqlite_sequence"} <= tables:
            build(conn)  # a store from before the id or a newer table: bring it up to date
        if not has_column(conn, "runs", "status"):  # a store from before run status: additive
            conn.execute("ALTER TABLE runs ADD COLUMN status TEXT")
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(write_message(path, "to it", e)) from None
    return conn

def check_ours(path: Path, conn: sqlite3.Connection) -> None:
    """Refuse (StoreError) a file that is not a chipcheck store of a schema this chipcheck reads."""
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"--db {path} is not a usable chipcheck database ({e}); "
                         f"move it aside or pass another --db") from None
    legacy = app == 0 and version >= 1 and {"runs", "results"} <= tables <= OUR_TABLES
    if app != APPLICATION_ID and not legacy:
        if path.stat().st_size == 0:
            what = "an empty file"
        elif app:
            what = f"another application's SQLite database (application_id {app:#x})"
        elif tables:
            shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
            what = f"another application's SQLite database (tables: {shown})"
        else:
            what = "an empty SQLite database that chipcheck did not create"
        raise StoreError(f"--db {path} is {what}, not a chipcheck store; chipcheck only uses a database "
                         f"it created: pass a new path (or remove the file if it is yours)")
    if version > SCHEMA_VERSION:
        raise StoreError(f"--db {path} was written by a newer chipcheck (schema {version})")
    try:
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        ok = str(e)
    if ok != "ok":
        raise StoreError(f"--db {path} is corrupt ({ok}); move it aside or pass another --db")

def create(path: Path) -> None:
    """A new store, built under a temporary name and linked into place only when complete."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    except OSError as e:
        raise StoreError(f"cannot create the store --db {path}: {e.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            build(conn)
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it meanwhile: it is checked like any existing file
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    except (OSError, sqlite3.Error) as e:
        text = why(path, e) if isinstance(e, sqlite3.Error) else e.strerror or str(e)
        raise StoreError(f"cannot create the store --db {path} ({text}); nothing was written") from None
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)


def has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


def build(conn: sqlite3.Connection) -> None:
    """Create what is missing of the schema and mark the file as a chipcheck store, in one transaction."""
    conn.executescript(f"BEGIN;{SCHEMA}PRAGMA application_id={APPLICATION_ID};"
                       f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")


def disk_full(path: Path) -> bool:
    """Whether the file system holding `path` has (almost) no space left for SQLite's next pages."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def why(path: Path, e: sqlite3.Error) -> str:
    """SQLite's error in the user's words: a full disk surfaces as `disk I/O error` when the -shm fails."""
    text = str(e)
    if "full" in text or ("I/O" in text and disk_full(path)):
        return "the disk is full"
    if "locked" in text or "busy" in text:
        return "the database is locked by another process (waited 30 s)"
    return text


def write_message(path: Path, what: str, e: sqlite3.Error) -> str:
    """One line for a failed write: the disk is full, the database is locked, read-only, ..."""
    return f"--db {path}: cannot write {what}: {why(path, e)}"
