"""The Slurm path end to end, on a real single-node cluster (Debian's munged, slurmctld, slurmd).

`chipcheck sweep --launcher slurm --submit` writes the sbatch script and submits it; srun starts
one worker per (CPU) device; rank 0 writes the store and --json; the script ingests the shards
(idempotently) and prints what is new. `chipcheck quarantine --format slurm --apply` then really
drains the node through scontrol.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, why_not

REASON = why_not()
# timing: real probes judge speed (2 devices), so these run alone after the parallel tests
pytestmark = [pytest.mark.skipif(bool(REASON), reason=REASON or "ok"), pytest.mark.timing]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.up()
    except (RuntimeError, OSError) as e:
        c.down()
        pytest.skip(f"the test Slurm cluster did not start: {str(e)[:500]}")
    yield c
    c.down()


def _cli(c: SlurmCluster, cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chipcheck.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=c.env, cwd=cwd)


def _sweep(c: SlurmCluster, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], str]:
    p = _cli(c, tmp, "sweep", "--launcher", "slurm", "--submit", "--wait", "--devices", "cpu", "--nodes", "1",
             "--ntasks-per-node", "2", "--db", str(tmp / "r.db"), "--json", str(tmp / "r.json"),
             "--local-dir", str(tmp / "shards"), "--timeout", "90", "--min-gap", "0.5", "-o", str(tmp / "job.sbatch"), *extra)
    job = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    out = tmp / f"chipcheck-{job}.out"
    return p, out.read_text() if out.exists() else f"(no job output {out})\n{c.logs()}"


def test_a_submitted_sweep_stores_every_device(cluster: SlurmCluster, tmp_path: Path) -> None:
    p, log = _sweep(cluster, tmp_path, "--probes", "matmul,collectives")
    assert p.returncode == 0, p.stderr + log
    script = (tmp_path / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "srun" in script and "RANK=$SLURM_PROCID" in script
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verdict"] == "pass" and len(data["devices"]) == 2
    assert {p["probe"] for d in data["devices"] for p in d["probes"]} == {"matmul", "collectives"}
    assert {d["host"] for d in data["devices"]} == {cluster.node}
    with sqlite3.connect(tmp_path / "r.db") as db:
        runs = db.execute("SELECT run_id, verdict, config FROM runs").fetchall()
        n = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert len(runs) == 1 and runs[0][1] == "pass" and json.loads(runs[0][2])["world_size"] == 2
    shards = sorted((tmp_path / "shards").glob("*.jsonl"))
    assert len(shards) == 2 and n == sum(len(s.read_text().splitlines()) for s in shards)
    # the script's own ingest found everything already stored by rank 0, and reported the news
    assert f"ingested 0 results from 2 shards ({n} already stored)" in log, log
    assert "New since the last sweep" in log


def test_quarantine_drains_the_failing_node_for_real(cluster: SlurmCluster, tmp_path: Path) -> None:
    p, log = _sweep(cluster, tmp_path, "--probes", "matmul", "--inject", "bitflip:rank=1,bit=20,rate=0.01")
    assert p.returncode == 1, p.stderr + log  # srun's exit code: a device failed
    data = json.loads((tmp_path / "r.json").read_text())
    bad = next(d for d in data["devices"] if d["rank"] == 1)
    assert bad["verdict"] == "wrong"
    assert bad["probes"][0]["failure_code"]["code"] == "CC-SDC-001"
    dry = _cli(cluster, tmp_path, "quarantine", "--format", "slurm", "--db", str(tmp_path / "r.db"))
    assert dry.returncode == 1 and f"NodeName={cluster.node} State=DRAIN" in dry.stdout, dry.stdout + dry.stderr
    assert cluster.node_state()[0].startswith("IDLE"), "printing the commands must not drain anything"
    try:
        q = _cli(cluster, tmp_path, "quarantine", "--format", "slurm", "--db", str(tmp_path / "r.db"), "--apply")
        assert q.returncode == 1, q.stderr
        state, reason = cluster.node_state()
        assert "DRAIN" in state and reason.startswith("chipcheck: CC-SDC-001 replace_chip cpu:1 matmul"), \
            (state, reason)
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={cluster.node}", "State=RESUME"], env=cluster.env,
                       capture_output=True, timeout=30)
