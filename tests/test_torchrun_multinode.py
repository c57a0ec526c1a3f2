"""A real two-node sweep on this machine: two torchrun invocations (static master, and c10d rendezvous).

Each invocation is one "node" (--nnodes 2, one CPU device each); rank 0 gathers over the TCPStore
and writes the store and --json; every node keeps its own JSONL shard, which `chipcheck ingest`
turns into the same run in a fresh store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_nodes(tmp: Path, launch: list[list[str]]) -> tuple[list[int], dict, str]:
    args = ["-m", "chipcheck.worker", "run", "--devices", "cpu", "--probes", "matmul", "--db", str(tmp / "r.db"),
            "--json", str(tmp / "r.json"), "--local-dir", str(tmp / "shards"), "-q", "--timeout", "90", "--min-gap", "0.5"]
    procs = []
    for node, flags in enumerate(launch):
        log = open(tmp / f"node{node}.log", "w")  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "CHIPCHECK_HOSTNAME": f"node{node}"}
        procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                       "--nproc-per-node", "1", *flags, *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=240) for p in procs]
    logs = "\n".join((tmp / f"node{i}.log").read_text()[-1500:] for i in range(len(launch)))
    assert (tmp / "r.json").exists(), logs
    return codes, json.loads((tmp / "r.json").read_text()), logs


@pytest.mark.timing  # real probes judge speed on two devices: run alone, after the parallel tests
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_torchrun_nodes_make_one_run(tmp_path: Path, rendezvous: str) -> None:
    port = _port()
    if rendezvous == "static":
        launch = [["--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port", str(port)] for i in (0, 1)]
    else:
        launch = [["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cc-test"]] * 2
    codes, data, logs = _two_nodes(tmp_path, launch)
    assert codes == [0, 0], logs
    assert data["verdict"] == "pass" and {d["host"] for d in data["devices"]} == {"node0", "node1"}
    shards = sorted((tmp_path / "shards").glob("*.jsonl"))
    assert len(shards) == 2
    # the shards alone rebuild the run (rank 0's store not needed), and ingest into rank 0's store adds nothing
    p = run_cli("ingest", "--db", str(tmp_path / "fresh.db"), str(tmp_path / "shards"))
    assert p.returncode == 0 and "(0 already stored)" in p.stdout, p.stderr
    p = run_cli("ingest", "--db", str(tmp_path / "r.db"), str(tmp_path / "shards"))
    assert p.returncode == 0 and p.stdout.startswith("ingested 0 results"), p.stdout
    rebuilt = json.loads(run_cli("report", "--db", str(tmp_path / "fresh.db"), "--format", "json").stdout)
    assert rebuilt["run_id"] == data["run_id"] and rebuilt["verdict"] == "pass"
    assert len(rebuilt["devices"]) == 2
