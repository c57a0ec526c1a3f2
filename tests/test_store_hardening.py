"""The store under hostile conditions (issue 20, items 4 and 5): a full disk, another application's
SQLite file, an empty file, read-only commands. Every failure is one line and exit 2; nothing
measured is lost; a file chipcheck did not create is never changed."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_cli
from fleet_history_helpers import store_runs

from chipcheck.fleet import ingest, synthetic
from chipcheck.fleet.store import APPLICATION_ID, Store, StoreError
from chipcheck.results import Verdict


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _one_line_exit_2(p: subprocess.CompletedProcess[str], words: str) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    assert words in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        c.execute("INSERT INTO customers (name) VALUES ('ada'), ('grace')")
    c.close()


# ---- another application's file -------------------------------------------------------------------

def test_a_new_store_carries_the_chipcheck_application_id(tmp_path: Path) -> None:
    Store(tmp_path / "r.db").close()
    assert sorted(os.listdir(tmp_path)) == ["r.db"]  # the temporary it was built in is gone
    with sqlite3.connect(tmp_path / "r.db") as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


@pytest.mark.parametrize("args", [
    ["run", "--devices", "cpu:1"],
    ["report"],
    ["report", "--format", "html"],
    ["history"],
    ["quarantine", "--format", "k8s"],
    ["ingest", "."],
])
def test_another_applications_database_is_refused_and_unchanged(tmp_path: Path, args: list[str]) -> None:
    db = tmp_path / "other.db"
    _foreign(db)
    before = _digest(db)
    p = run_cli(*args[:1], "--db", str(db), *args[1:])
    _one_line_exit_2(p, "another application's SQLite database (tables: customers), not a chipcheck store")
    assert _digest(db) == before
    assert sorted(os.listdir(tmp_path)) == ["other.db"]  # no -wal, no -shm, no journal


def test_a_foreign_application_id_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA application_id=1234")
        c.execute("CREATE TABLE runs (x)")  # even with a table named like ours
        c.execute("CREATE TABLE results (x)")
        c.execute("PRAGMA user_version=1")
    before = _digest(db)
    with pytest.raises(StoreError, match="application_id 0x4d2"):
        Store(db)
    assert _digest(db) == before


def test_an_empty_file_is_refused_not_turned_into_a_store(tmp_path: Path) -> None:
    """Decision (docs in fleet/store.py): a 0-byte file is refused like any file chipcheck did not
    create; it may be another program's placeholder, and chipcheck never leaves one itself."""
    db = tmp_path / "empty.db"
    db.touch()
    p = run_cli("run", "--db", str(db), "--devices", "cpu:1")
    _one_line_exit_2(p, "is an empty file, not a chipcheck store")
    assert db.stat().st_size == 0 and sorted(os.listdir(tmp_path)) == ["empty.db"]
    p = run_cli("report", "--db", str(db))
    _one_line_exit_2(p, "is an empty file")


def test_an_empty_sqlite_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "blank.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE t (x)")
        c.execute("DROP TABLE t")
    before = _digest(db)
    with pytest.raises(StoreError, match="an empty SQLite database that chipcheck did not create"):
        Store(db)
    assert _digest(db) == before


def test_a_store_from_before_the_marker_is_still_ours(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store_runs(db, 4, 1)
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA application_id=0")  # as every store written before the marker
    c.close()
    before = _digest(db)
    p = run_cli("report", "--db", str(db))  # read-only: accepted, not stamped
    assert p.returncode == 0, p.stderr
    assert _digest(db) == before
    Store(db).close()  # read-write: stamped
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_read_only_commands_never_change_the_store(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store_runs(db, 8, 3, fail={2: 0.25}, seed=5)
    before = _digest(db)
    # the html report and history build the history index: on a read-only store it stays in memory
    for args in (["report", "--format", "html", "-o", str(tmp_path / "r.html")], ["history"],
                 ["quarantine", "--format", "hosts"], ["report", "latest"]):
        p = run_cli(*args[:1], "--db", str(db), *args[1:])
        assert p.returncode in (0, 1), p.stderr
        assert _digest(db) == before, args
    assert "<html" in (tmp_path / "r.html").read_text()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        assert c.execute("SELECT count(*) FROM device_runs").fetchone()[0] == 0  # nothing indexed on disk


def test_a_read_only_store_refuses_writes(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store_runs(db, 2, 1)
    s = Store(db, readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        s.begin_run("x", host="h", profile="quick", seed=0, argv=[], config={})
    s.close()


# ---- a full disk --------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (needs root, as in CI; skipped where mount is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(fs: Path, leave: int = 0) -> Path:
    """Fill the file system, then free `leave` bytes; returns the filler (unlink it to free the space)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 65536)
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"x" * 512)
    except OSError:
        pass
    if leave:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    os.close(fd)
    return filler


def test_a_new_store_on_a_full_disk_leaves_no_file(small_fs: Path) -> None:
    _fill(small_fs)
    with pytest.raises(StoreError, match=r"cannot create the store .* \(the disk is full\); nothing was written"):
        Store(small_fs / "r.db")
    p = run_cli("run", "--db", str(small_fs / "r2.db"), "--devices", "cpu:1")
    _one_line_exit_2(p, "the disk is full")
    assert sorted(os.listdir(small_fs)) == ["filler"]


def test_a_full_disk_before_the_run_is_one_line_and_the_store_stays_readable(small_fs: Path) -> None:
    db = small_fs / "r.db"
    store_runs(db, 4, 1)
    _fill(small_fs)
    p = run_cli("run", "--db", str(db), "--devices", "cpu:1", "-q")
    _one_line_exit_2(p, "the disk is full")
    p = run_cli("report", "--db", str(db), "--format", "json")  # what was measured before is readable
    assert p.returncode == 0 and '"run_id": "20260000T000000-syn"' in p.stdout, p.stderr


def test_results_of_a_run_that_fills_the_disk_are_kept_and_restored(small_fs: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    db = small_fs / "r.db"
    f = synthetic.fleet(16, fail_fraction=0.0, seed=1, run_id="20261201T000000-full")
    results = [replace(r, params={**r.params, "pad": "p" * 4000}) for r in f.results]  # every insert needs pages
    s = Store(db)
    s.begin_run(f.run_id, host="node0000", profile="quick", seed=0, argv=[], config={})
    s.add_devices(f.run_id, f.devices.items())
    for r in results[:3]:
        s.add_result(r)
    filler = _fill(small_fs)
    for r in results[3:]:
        s.add_result(r)  # never raises mid-run: the run goes on, the results go to the unsaved file
    assert s.failure is not None and "the disk is full" in s.failure
    with pytest.raises(StoreError) as e:
        s.end_run(f.run_id, Verdict.PASS)
    s.close()
    msg = str(e.value)
    assert "\n" not in msg and "the disk is full" in msg and f"chipcheck ingest {s.spool} --db {db}" in msg
    assert s.spool is not None and s.spool.parent == spool_dir  # beside the store there is no room
    assert sorted(os.listdir(small_fs)) in (["filler", "r.db"], ["filler", "r.db", "r.db-shm", "r.db-wal"])
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        stored = c.execute("SELECT count(*) FROM results").fetchone()[0]
    assert stored >= 3 and stored + s.unsaved == len(results) and s.lost == 0
    filler.unlink()  # space freed: the unsaved file goes in like any shard
    spool, unsaved = s.spool, s.unsaved
    s = Store(db)
    rep = ingest.ingest(s, [str(spool)])
    assert rep.added == unsaved and rep.bad_lines == 0
    assert s.conn.execute("SELECT count(*) FROM results").fetchone()[0] == len(results)
    s.close()


def test_a_cli_run_that_fills_the_disk_exits_2_and_keeps_every_result(small_fs: Path, tmp_path: Path) -> None:
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    db = small_fs / "r.db"
    Store(db).close()
    filler = _fill(small_fs, leave=96 * 1024)  # room to start the run and store a few results
    p = run_cli("run", "--db", str(db), "--devices", "cpu:2", "-q", env={"TMPDIR": str(spool_dir)})
    _one_line_exit_2(p, "the disk is full")
    (spool,) = spool_dir.glob("r.db.unsaved-*.jsonl")
    assert f"are in {spool}" in p.stderr
    unsaved = len(spool.read_text().splitlines())
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        stored = c.execute("SELECT count(*) FROM results").fetchone()[0]
    assert unsaved > 0
    assert not [x for x in os.listdir(small_fs) if "unsaved" in x]  # no empty file where there was no room
    filler.unlink()
    p = run_cli("ingest", "--db", str(db), str(spool))
    assert p.returncode == 0 and p.stdout.startswith(f"ingested {unsaved} results from 1 shards"), p.stderr
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        assert c.execute("SELECT count(*) FROM results").fetchone()[0] == stored + unsaved
