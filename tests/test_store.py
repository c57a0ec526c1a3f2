"""The SQLite store: results written as they come, bad files refused with one clear error."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from chipcheck.fleet.store import Store, StoreError
from chipcheck.results import ErrorInfo, ErrorKind, Mismatch, Oracle, ProbeResult, Verdict


def _result(rank: int) -> ProbeResult:
    return ProbeResult(run_id="run1", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="f", probe="matmul",
                       case="float32/exact", verdict=Verdict.WRONG, seed=3, metrics={"tflops": 1.5},
                       mismatches=[Mismatch(oracle=Oracle.EXACT, tensor="C", bad_elements=1, total_elements=4,
                                            bit_histogram={20: 1})],
                       error=ErrorInfo(kind=ErrorKind.TIMEOUT, message="x"))


def test_round_trip_and_wal(tmp_path: Path) -> None:
    s = Store(tmp_path / "r.db")
    s.begin_run("run1", host="h", profile="quick", seed=3, argv=["x"], config={})
    s.add_result(_result(0))
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # another connection sees it at once: committed, not buffered
    other = sqlite3.connect(tmp_path / "r.db")
    assert other.execute("SELECT count(*) FROM results").fetchone()[0] == 1
    (back,) = s.results("run1")
    assert back == _result(0)
    assert s.latest_run() == "run1"


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "bad.db"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable chipcheck database"):
        Store(p)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(StoreError, match="not writable"):
        Store(d / "r.db")


def test_directory_that_cannot_exist_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="cannot create"):
        Store(f / "sub" / "r.db")
