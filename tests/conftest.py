"""Shared fixtures: every test gets its own results database and runs the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "results.db"


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`chipcheck ARGS` in a real subprocess (the console script's module), capturing output."""
    return subprocess.run([sys.executable, "-m", "chipcheck.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_json(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[int, dict, str]:
    out = tmp_path / "run.json"
    p = run_cli("run", "--db", str(tmp_path / "results.db"), "--json", str(out), "-q", *args, timeout=timeout)
    data = json.loads(out.read_text()) if out.exists() else {}
    return p.returncode, data, p.stdout + p.stderr


def device(data: dict, rank: int) -> dict:
    return next(d for d in data["devices"] if d["rank"] == rank)
