"""The JAX path's supervisor (fleet/jax_runner.py): a hung or crashed host process is recorded
on the ranks of the case it was in, and a fresh host process carries on with the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

FORCE3 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"}


def _run(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    out = tmp_path / "run.json"
    p = subprocess.run([sys.executable, "-m", "chipcheck.cli", "run", "--backend", "jax", "--db",
                        str(tmp_path / "r.db"), "--json", str(out), "-q", "--min-gap", "0.9", *args],
                       capture_output=True, text=True, timeout=240, env={**os.environ, **FORCE3})
    return p.returncode, json.loads(out.read_text()) if out.exists() else {}, p.stdout + p.stderr


def _by_rank(data: dict) -> dict[int, dict]:
    return {d["rank"]: d for d in data["devices"]}


def _results(tmp_path: Path) -> list[dict]:
    import sqlite3

    with sqlite3.connect(tmp_path / "r.db") as c:
        return [json.loads(b) for (b,) in c.execute("SELECT body FROM results ORDER BY id")]


def test_hang_is_a_timeout_on_that_rank_and_the_run_goes_on(tmp_path: Path) -> None:
    rc, data, out = _run(tmp_path, "--probes", "matmul,collectives", "--timeout", "15",
                         "--inject", "hang:rank=1,probe=matmul")
    assert rc == 1, out[-3000:]
    ranks = _by_rank(data)
    assert ranks[0]["verdict"] == "pass" and ranks[2]["verdict"] == "pass"
    assert ranks[1]["verdict"] == "error"
    res = _results(tmp_path)
    r1 = [r for r in res if r["rank"] == 1]
    mm = [r for r in r1 if r["probe"] == "matmul"]
    assert mm[0]["error"]["kind"] == "timeout" and "15s watchdog" in mm[0]["error"]["message"]
    assert all(r["error"]["message"].startswith("not run") for r in mm[1:])
    # later probes ran in a fresh host process, on every rank
    att = [r for r in r1 if r["probe"] == "collectives"]
    assert att and all(r["verdict"] == "pass" for r in att)
    # nothing reported twice, nothing missing: every (probe, case, rank) exactly once
    keys = [(r["probe"], r["case"], r["rank"]) for r in res]
    assert len(keys) == len(set(keys))
    assert {k[:2] for k in keys if k[2] == 0} == {k[:2] for k in keys if k[2] == 1}


def test_crash_is_recorded_with_its_signal(tmp_path: Path) -> None:
    rc, data, out = _run(tmp_path, "--probes", "matmul", "--inject", "crash:rank=2,after=1")
    assert rc == 1, out[-3000:]
    ranks = _by_rank(data)
    assert [ranks[r]["verdict"] for r in range(3)] == ["pass", "pass", "error"]
    err = [r for r in _results(tmp_path) if r["rank"] == 2 and r["error"]]
    assert "signal 9" in err[0]["error"]["message"] and err[0]["error"]["kind"] == "crash"


def test_hang_inside_a_collective_names_every_rank_of_it(tmp_path: Path) -> None:
    rc, data, out = _run(tmp_path, "--probes", "collectives", "--timeout", "15",
                         "--inject", "hang:rank=0,op=psum")
    assert rc == 1, out[-3000:]
    res = _results(tmp_path)
    psum = [r for r in res if r["case"].startswith("all_reduce_sum/")]
    first = psum[:3]
    assert {r["rank"] for r in first} == {0, 1, 2} and all(r["error"]["kind"] == "timeout" for r in first)
