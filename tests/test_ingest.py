"""`chipcheck ingest`: shards from many nodes into the store, idempotently, judged as rank 0 would."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import run_cli

from chipcheck.fleet import synthetic


def _shards(tmp: Path, n: int = 16, nodes: int = 2) -> tuple[Path, int]:
    """One shard per rank, as every rank of a distributed run writes them (rank 0 'died': no store)."""
    f = synthetic.fleet(n, fail_fraction=0.25, seed=3, run_id="20261125T010000-abcdef")
    d = tmp / "shards"
    for node in range(nodes):
        (d / f"node{node}").mkdir(parents=True)
    for r in f.results:
        path = d / f"node{r.rank % nodes}" / f"{r.run_id}-{r.host}-rank{r.rank}.jsonl"
        with path.open("a") as out:
            out.write(r.to_json() + "\n")
    return d, len(f.results)


def test_ingest_twice_adds_nothing_the_second_time(tmp_path: Path) -> None:
    shards, n = _shards(tmp_path)
    db = tmp_path / "r.db"
    p = run_cli("ingest", "--db", str(db), str(shards))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"ingested {n} results from 16 shards (0 already stored)")
    p = run_cli("ingest", "--db", str(db), str(shards / "node0"), str(shards / "node1"))
    assert p.returncode == 0 and p.stdout.startswith(f"ingested 0 results from 16 shards ({n} already stored)")
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM results").fetchone()[0] == n
        assert c.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 16
        (verdict,) = c.execute("SELECT verdict FROM runs").fetchone()
    assert verdict == "wrong"
    # the ingested run is judged (consensus and all) and reads like any other
    p = run_cli("report", "--db", str(db), "--format", "json")
    data = json.loads(p.stdout)
    assert p.returncode == 1 and data["summary"]["failed"] >= 3


def test_half_a_run_then_the_rest_is_judged_again(tmp_path: Path) -> None:
    shards, n = _shards(tmp_path)
    db = tmp_path / "r.db"
    assert run_cli("ingest", "--db", str(db), str(shards / "node0")).returncode == 0
    assert run_cli("ingest", "--db", str(db), str(shards / "node1")).returncode == 0
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM results").fetchone()[0] == n
        assert c.execute("SELECT COUNT(DISTINCT rank) FROM devices").fetchone()[0] == 16


def test_a_torn_last_line_is_counted_not_fatal(tmp_path: Path) -> None:
    shards, n = _shards(tmp_path, n=4, nodes=1)
    one = sorted((shards / "node0").glob("*.jsonl"))[0]
    one.write_text(one.read_text() + '{"run_id": "20261125T0100')
    p = run_cli("ingest", "--db", str(tmp_path / "r.db"), str(shards))
    assert p.returncode == 0 and "1 unreadable lines" in p.stdout


def test_a_file_with_no_result_in_it_is_exit_2_after_naming_its_lines(tmp_path: Path) -> None:
    p = run_cli("ingest", "--db", str(tmp_path / "r.db"), "/etc/passwd")  # a wrong path: it said exit 0
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[0].startswith("chipcheck: warning: /etc/passwd:1: not JSON")
    assert p.stderr.splitlines()[-1] == ("chipcheck: error: nothing in /etc/passwd is a chipcheck result (the JSONL "
                                         "shards a torchrun or Slurm sweep writes, or a run's unsaved file)")
    assert "ingested 0 results" in p.stdout


def test_a_missing_path_is_exit_2(tmp_path: Path) -> None:
    p = run_cli("ingest", "--db", str(tmp_path / "r.db"), str(tmp_path / "nope"))
    assert p.returncode == 2 and "no such shard or folder" in p.stderr
