"""Every numeric option is finite and in range: `--timeout nan` would disable the watchdog (issue 20, item 6)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "0"])
def test_timeout_must_be_finite_and_positive(tmp_path: Path, value: str) -> None:
    db = tmp_path / "r.db"
    p = run_cli("run", "--db", str(db), "--devices", "cpu:1", f"--timeout={value}")
    assert p.returncode == 2, p.stderr
    assert "--timeout must be > 0 seconds and finite" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    if db.exists():  # nothing was started
        assert sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone()[0] == 0


@pytest.mark.parametrize("flag", ["--min-gap=nan", "--min-gap=inf"])
def test_min_gap_nan_is_refused(tmp_path: Path, flag: str) -> None:
    p = run_cli("run", "--db", str(tmp_path / "r.db"), "--devices", "cpu:1", flag)
    assert p.returncode == 2 and "--min-gap" in p.stderr and "Traceback" not in p.stderr
