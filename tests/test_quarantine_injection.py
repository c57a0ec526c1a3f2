"""Host names never become options or records (issue 20, item 8): `--all` would cordon every node of
the cluster, a newline would forge a line of `--format hosts`. Stand-in `kubectl`/`scontrol` on PATH
record the argv they are given."""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import replace
from pathlib import Path

from conftest import run_cli

from chipcheck.fleet import records, synthetic
from chipcheck.fleet.store import Store

EVIL = ["--all", "node9\nnode7\tCC-SDC-001\treplace_chip\tforged", "a b", "$(reboot)", "node[1-100]", "-n"]


def _stand_ins(tmp: Path) -> tuple[dict[str, str], Path]:
    bin_dir, log = tmp / "bin", tmp / "argv.jsonl"
    bin_dir.mkdir()
    for tool in ("kubectl", "scontrol"):
        fake = bin_dir / tool
        fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def _poisoned_store(db: Path, evil: list[str] = EVIL) -> tuple[set[str], set[str]]:
    """A judged run whose failing devices sit on hostile host names (as a store written before ingest
    checked names could hold); returns (the good hosts to drain, the hostile hosts that fail)."""
    f = synthetic.fleet(24, fail_fraction=0.5, seed=4, run_id="20261201T000000-evil")
    summary, _ = synthetic.judge(f)
    failing = sorted({d.rank for d in summary.failed})
    rename = {rank: evil[i] for i, rank in enumerate(failing[:len(evil)])}
    devices = {r: replace(d, host=rename.get(r, d.host)) for r, d in f.devices.items()}
    f = replace(f, devices=devices, results=[replace(x, host=rename.get(x.rank, x.host)) for x in f.results])
    summary, judgements = synthetic.judge(f)
    s = Store(db)
    s.begin_run(f.run_id, host="node0000", profile="quick", seed=0, argv=[], config={}, started=f.started)
    s.add_devices(f.run_id, devices.items())
    for r in f.results:
        s.add_result(r)
    s.add_judgements(f.run_id, judgements)
    s.end_run(f.run_id, summary.verdict)
    s.close()
    failed = {d.host for d in summary.failed}
    assert len(failed & set(evil)) >= min(3, len(evil))
    return failed - set(evil), failed & set(evil)


def test_host_names_are_checked_against_rfc_1123() -> None:
    for good in ("node0001", "gpu-a100-7.cluster.example.com", "N1", "h"):
        assert records.host_problem(good) is None and records.k8s_node_problem(good) is None
    for bad in EVIL + ["", "-node", "node-", "_node", "node_", "a" * 64, "node..x", "nöde", "x" * 254]:
        assert records.host_problem(bad) is not None, bad
    # Slurm node names and /etc/hosts aliases carry underscores; Kubernetes node names cannot
    assert records.host_problem("gpu_node_01") is None
    assert "not a Kubernetes node name" in (records.k8s_node_problem("gpu_node_01") or "")


def test_k8s_apply_never_passes_a_hostile_host(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    good, evil = _poisoned_store(db)
    env, log = _stand_ins(tmp_path)
    p = run_cli("quarantine", "--format", "k8s", "--db", str(db), "--no-history", "--apply", env=env)
    assert p.returncode == 2 and "host name(s)" in p.stderr and "were drained" in p.stderr, p.stderr
    assert 3 <= p.stdout.count("# refused: host ") <= len(evil)  # each failing hostile host named, repr-escaped
    assert "cordon -- --all" not in p.stdout and "\nnode7" not in p.stdout
    calls = [json.loads(x)[1:] for x in log.read_text().splitlines()]
    assert calls and {c[c.index("--") + 1] for c in calls} == good  # only the good hosts, each after `--`
    for c in calls:
        assert c[0] in ("cordon", "taint", "annotate")
        assert not any(e in c for e in EVIL) and not any("\n" in a for a in c)


def test_slurm_apply_and_hosts_format_never_carry_a_hostile_host(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    good, _ = _poisoned_store(db)
    env, log = _stand_ins(tmp_path)
    p = run_cli("quarantine", "--format", "slurm", "--db", str(db), "--no-history", "--apply", env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr  # the others drained
    calls = [json.loads(x)[1:] for x in log.read_text().splitlines()]
    assert {c[1] for c in calls} == {f"NodeName={h}" for h in good}
    p = run_cli("quarantine", "--format", "hosts", "--db", str(db), "--no-history")
    records_out = [x for x in p.stdout.splitlines() if not x.startswith("#")]
    assert {x.split("\t")[0] for x in records_out} == good  # no forged `node7` record
    assert all(len(x.split("\t")) == 4 for x in records_out)


def test_a_shard_with_a_hostile_host_is_refused_at_ingest(tmp_path: Path) -> None:
    f = synthetic.fleet(4, fail_fraction=0.0, seed=1, run_id="20261201T000000-shard")
    shard = tmp_path / "s.jsonl"
    shard.write_text("".join(replace(r, host="--all" if r.rank == 1 else r.host).to_json() + "\n"
                             for r in f.results))
    p = run_cli("ingest", "--db", str(tmp_path / "r.db"), str(shard))
    assert p.returncode == 0 and "host '--all' is not a valid host name" in p.stderr, p.stderr
    assert sum(1 for r in f.results if r.rank == 1) == int(p.stdout.split("stored, ")[1].split()[0])


def test_an_underscored_slurm_node_is_drained_and_refused_only_for_kubernetes(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    good, odd = _poisoned_store(db, ["gpu_node_01"])
    env, log = _stand_ins(tmp_path)
    p = run_cli("quarantine", "--format", "slurm", "--db", str(db), "--no-history", "--apply", env=env)
    assert p.returncode == 1, p.stderr
    assert {json.loads(x)[2] for x in log.read_text().splitlines()} == {f"NodeName={h}" for h in good | odd}
    p = run_cli("quarantine", "--format", "k8s", "--db", str(db), "--no-history", env=env)
    assert p.returncode == 2 and "# refused: host 'gpu_node_01' is not a Kubernetes node name" in p.stdout, p.stdout
