"""`chipcheck run --backend jax` as one process per "host" of a multi-host JAX job: two
processes with two forced host CPU devices each, joined through jax.distributed (the coordinator
on a free local port), each with its own supervisor, store and --json; every process ends with
the whole job's results, judged alike."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from conftest import free_port  # noqa: E402


def _job(tmp_path: Path, *args: str) -> list[tuple[int, dict, str]]:
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = []
    for i in (0, 1):
        cmd = [sys.executable, "-m", "chipcheck.cli", "run", "--backend", "jax", "--coordinator",
               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "--db", str(tmp_path / f"r{i}.db"),
               "--json", str(tmp_path / f"r{i}.json"), "-q", "--min-gap", "0.9", *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**env, "CHIPCHECK_HOSTNAME": f"host{i}"}))
    out = []
    for i, p in enumerate(procs):
        text, _ = p.communicate(timeout=300)
        js = tmp_path / f"r{i}.json"
        out.append((p.returncode, json.loads(js.read_text()) if js.exists() else {}, text))
    return out


def _verdicts(data: dict) -> dict[int, tuple[str, str]]:
    return {d["rank"]: (d["host"], d["verdict"]) for d in data["devices"]}


def _results(db: Path) -> list[dict]:
    with sqlite3.connect(db) as c:
        return [json.loads(b) for (b,) in c.execute("SELECT body FROM results")]


def test_clean_job_of_two_hosts(tmp_path: Path) -> None:
    (rc0, d0, o0), (rc1, d1, o1) = _job(tmp_path, "--probes", "matmul,collectives")
    assert (rc0, rc1) == (0, 0), o0[-2000:] + o1[-2000:]
    want = {0: ("host0", "pass"), 1: ("host0", "pass"), 2: ("host1", "pass"), 3: ("host1", "pass")}
    assert _verdicts(d0) == want and _verdicts(d1) == want
    res = _results(tmp_path / "r0.db")
    coll = [r for r in res if r["probe"] == "collectives"]
    assert {r["rank"] for r in coll} == {0, 1, 2, 3} and all(r["params"]["world_size"] == 4 for r in coll)
    # process 1's store holds the same run: every result of the job
    assert len(_results(tmp_path / "r1.db")) == len(res)


def test_faults_on_the_second_host_are_named_in_both(tmp_path: Path) -> None:
    # matmul last, and slower on host1 (rank 2's checks find the flips): host0 finishes first and
    # must not take the job's coordinator away while host1 still computes
    (rc0, d0, o0), (rc1, d1, o1) = _job(tmp_path, "--probes", "collectives,matmul",
                                        "--inject", "bitflip:rank=2,bit=20,index=0,op=all_gather",
                                        "--inject", "bitflip:rank=2,bit=20,op=dot_general",
                                        "--inject", "bitflip:rank=3,bit=21,op=dot_general")
    assert (rc0, rc1) == (1, 1), o0[-2000:] + o1[-2000:]
    want = {0: ("host0", "pass"), 1: ("host0", "pass"), 2: ("host1", "wrong"), 3: ("host1", "wrong")}
    assert _verdicts(d0) == want and _verdicts(d1) == want
    assert not any(r["error"] for r in _results(tmp_path / "r0.db"))  # nobody aborted by a departed coordinator
    gather = [r for r in _results(tmp_path / "r0.db") if r["rank"] == 2 and r["case"] == "all_gather/float32"][0]
    assert gather["verdict"] == "wrong" and "holds rank 2's elem" in gather["mismatches"][0]["note"]


def test_a_host_that_dies_is_named_and_the_job_still_reports(tmp_path: Path) -> None:
    (rc0, d0, o0), (rc1, d1, o1) = _job(tmp_path, "--probes", "matmul,collectives", "--timeout", "20",
                                        "--inject", "crash:rank=3,probe=matmul")
    assert (rc0, rc1) == (1, 1), o0[-2000:] + o1[-2000:]
    res = _results(tmp_path / "r0.db")
    r3 = [r for r in res if r["rank"] == 3]
    assert r3[0]["error"]["kind"] == "crash" and "signal 9" in r3[0]["error"]["message"]
    keys = [(r["probe"], r["case"], r["rank"]) for r in res]
    assert len(keys) == len(set(keys))  # nothing twice
    assert {k[:2] for k in keys if k[2] == 0} == {k[:2] for k in keys if k[2] == 3}  # nothing missing
    assert _verdicts(d0)[3] == ("host1", "error") and _verdicts(d1)[3] == ("host1", "error")
    # host0 stops waiting for host1 as soon as host1's supervisor says it is gone (not at a timeout),
    # and its collectives name the lost process
    r0 = [r for r in res if r["rank"] == 0 and r["probe"] == "collectives"]
    assert r0 and all(r["error"] and "process 1 of the JAX job" in r["error"]["message"] for r in r0)
    assert all(r["error"]["kind"] != "timeout" for r in r0)
    assert all(r["verdict"] == "pass" for r in res if r["rank"] in (0, 1) and r["probe"] == "matmul")
