"""A run cut short by SIGINT or SIGTERM on the torchrun and JAX paths (issue 20 item 3, through the one
run lifecycle of fleet/session.py): the run is stored `interrupted`, what was measured before the
signal is kept, every report says so and exits non-zero, and no process of the run is left.

(The local launcher's twin of these tests is test_run_faults.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import ctrl_c_default, marked_processes, run_cli, wait_until

SIGNALS = [signal.SIGINT, signal.SIGTERM]


def _per_rank(db: Path) -> dict[int, int]:
    """Stored results per rank (empty while the store or the run does not exist yet)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return dict(c.execute("SELECT rank, COUNT(*) FROM results GROUP BY rank").fetchall())
    except sqlite3.Error:
        return {}


def _shard_lines(shards: Path) -> dict[int, int]:
    """Complete result lines per rank in the run's shards."""
    out: dict[int, int] = {}
    for p in shards.glob("*.jsonl"):
        for line in p.read_text().splitlines():
            try:
                rank = json.loads(line)["rank"]
            except (ValueError, KeyError):
                continue  # a line being written
            out[rank] = out.get(rank, 0) + 1
    return out


def _cut_short(proc: subprocess.Popen[bytes], sig: signal.Signals, mark: str, log: Path) -> int:
    os.kill(proc.pid, sig)
    try:
        rc = proc.wait(timeout=45)
    finally:
        proc.kill()
    # every process of the run is gone within moments
    wait_until(lambda: not marked_processes(mark), 15, f"no process of the run left after {sig.name}: {log.read_text()[-2000:]}")
    return rc


def _assert_interrupted(db: Path, log: Path, *, lists_missing: bool) -> dict:
    rep = run_cli("report", "latest", "--db", str(db))
    assert rep.returncode == 1, rep.stdout + rep.stderr + log.read_text()[-2000:]
    assert "run INTERRUPTED" in rep.stdout, rep.stdout
    assert "verdict: PASS" not in rep.stdout and "INTERRUPTED  (so far: " in rep.stdout, rep.stdout
    js = run_cli("report", "latest", "--db", str(db), "--format", "json")
    assert js.returncode == 1
    data = json.loads(js.stdout)
    assert data["status"] == "interrupted", data.get("status")
    # the torchrun path stores its plan, so the cases not reached are listed; the JAX path learns its
    # devices from the host process, after the run began, and lists devices without a result only
    assert bool(data["missing"]) or not lists_missing
    return data


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_torchrun_run_cut_short_is_stored_interrupted(tmp_path: Path, sig: signal.Signals) -> None:
    mark, db, shards, log = uuid.uuid4().hex, tmp_path / "r.db", tmp_path / "shards", tmp_path / "torchrun.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(_port()),
             "-m", "chipcheck.worker", "run", "--devices", "cpu", "--probes", "matmul,collectives", "--db", str(db),
             "--local-dir", str(shards), "-q", "--timeout", "90", "--min-gap", "0.9"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "CHIPCHECK_TEST_MARK": mark},
            preexec_fn=ctrl_c_default)
    try:
        # rank 0 stores its results as they come (a speed judgement needs two on one rank)
        wait_until(lambda: _per_rank(db).get(0, 0) >= 2 and len(_shard_lines(shards)) == 2, 120,
              f"results of both ranks: {log.read_text()[-2000:]}")
        before = _shard_lines(shards)
    except BaseException:
        proc.kill()
        raise
    rc = _cut_short(proc, sig, mark, log)
    assert rc != 0
    data = _assert_interrupted(db, log, lists_missing=True)
    stored = _per_rank(db)
    # everything both ranks measured before the signal is in the store (rank 1's from its shard)
    assert all(stored.get(rank, 0) >= n for rank, n in before.items()), (before, stored)
    assert data["run_id"] and {d["rank"] for d in data["devices"]} == {0, 1}


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_jax_run_cut_short_is_stored_interrupted(tmp_path: Path, sig: signal.Signals) -> None:
    pytest.importorskip("jax")
    mark, db, log = uuid.uuid4().hex, tmp_path / "r.db", tmp_path / "jax.log"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "CHIPCHECK_TEST_MARK": mark}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chipcheck.cli", "run", "--backend", "jax", "--db", str(db),
                                 "-q", "--min-gap", "0.9", "--probes", "matmul,collectives"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=ctrl_c_default)
    try:
        wait_until(lambda: max(_per_rank(db).values(), default=0) >= 2, 150, f"two results: {log.read_text()[-2000:]}")
        before = _per_rank(db)
        assert len(marked_processes(mark)) >= 2, "the supervisor and its JAX host process"
    except BaseException:
        proc.kill()
        raise
    rc = _cut_short(proc, sig, mark, log)
    assert rc != 0
    _assert_interrupted(db, log, lists_missing=False)
    stored = _per_rank(db)
    assert all(stored.get(rank, 0) >= n for rank, n in before.items()), (before, stored)
    run_id = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT run_id FROM runs").fetchone()[0]
    assert not list(Path(tempfile.gettempdir()).glob(f"chipcheck-{run_id}*"))  # no temporary directory
