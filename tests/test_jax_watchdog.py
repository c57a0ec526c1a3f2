"""The JAX path's supervisor (fleet/jax_runner.py): a hung or crashed host process is recorded
on the ranks of the case it was in, and a fresh host process carries on with the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from jax_cli import run_jax  # noqa: E402


def _run(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    return run_jax(tmp_path, 3, *args)


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
