"""Failure codes, the quarantine commands per scheduler, and --apply only when asked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from conftest import run_cli
from fleet_history_helpers import store_runs

from chipcheck import failures
from chipcheck.fleet import quarantine as q
from chipcheck.fleet import synthetic
from chipcheck.reports import json_report
from chipcheck.results import CaseSummary, ProbeSummary, Verdict


def test_every_code_is_unique_and_well_formed() -> None:
    codes = [c.code for c in failures.ALL]
    assert len(set(codes)) == len(codes)
    assert all(c.startswith("CC-") and c[-3:].isdigit() for c in codes)
    assert failures.SDC_EXACT.action is failures.Action.REPLACE_CHIP and failures.SDC_EXACT.action.out_of_service
    assert not failures.SLOW.action.out_of_service


def test_each_failure_gets_its_code_in_the_json() -> None:
    s = synthetic.run(200, fail_fraction=0.1, seed=2)
    data = json_report.to_dict(s)
    seen = {}
    for d in data["devices"]:
        for p in d["probes"]:
            assert ("failure_code" in p) == (p["verdict"] != "pass")
            if "failure_code" in p:
                seen.setdefault(p["verdict"], set()).add(p["failure_code"]["code"])
    assert seen["wrong"] == {"CC-SDC-001"}  # the exact oracle outranks the consensus one on the same probe
    only_consensus = ProbeSummary(probe="matmul", verdict=Verdict.WRONG, metrics={},
                                  cases=[CaseSummary(case="bfloat16/random", verdict=Verdict.PASS)])
    assert failures.for_probe(only_consensus) is failures.SDC_CONSENSUS
    assert seen["slow"] == {"CC-PERF-001"} and seen["flaky"] == {"CC-FLK-001"} and seen["error"] == {"CC-ERR-001"}


def test_commands_per_format_name_the_host_and_the_reason() -> None:
    s = synthetic.run(64, fail_fraction=0.1, seed=1)
    plans = q.collect(s)
    failing_hosts = {d.host for d in s.devices if d.verdict.value != "pass"}
    assert {p.host for p in plans} == failing_hosts
    cmds, notes = q.commands(plans, q.Format.SLURM, s.run_id)
    drained = {p.host for p in plans if p.out_of_service}
    assert {c.host for c in cmds} == drained and len(cmds) == len(drained)
    assert all(c.display.startswith(f"scontrol update NodeName={c.host} State=DRAIN Reason=\"chipcheck: CC-")
               for c in cmds)
    assert all(c.argv[-1].startswith("Reason=chipcheck: ") for c in cmds)
    assert len(notes) == len(plans) - len(drained)  # slow-only hosts: a retest, not a drain
    k8s, _ = q.commands(plans, q.Format.K8S, s.run_id)
    host = sorted(drained)[0]
    mine = [c.display for c in k8s if c.host == host]
    assert mine[0] == f"kubectl cordon -- {host}"
    assert mine[1].startswith(f"kubectl taint nodes --overwrite -- {host} chipcheck.io/quarantine=CC-")
    assert "NoSchedule" in mine[1]
    hosts, _ = q.commands(plans, q.Format.HOSTS, s.run_id)
    assert all(len(c.display.split("\t")) == 4 and not c.argv for c in hosts)


def test_apply_runs_only_when_asked(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store_runs(db, 24, 1, fail={0: 0.25}, seed=7)
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"  # stands in for Slurm's; tests/test_slurm.py drains a real node
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    p = run_cli("quarantine", "--format", "slurm", "--db", str(db), env=env)
    assert p.returncode == 1 and "State=DRAIN" in p.stdout, p.stderr
    assert not log.exists()
    p = run_cli("quarantine", "--format", "slurm", "--db", str(db), "--apply", env=env)
    assert p.returncode == 1, p.stderr
    lines = log.read_text().splitlines()
    assert lines and all(x.startswith("update NodeName=node") and "State=DRAIN Reason=chipcheck: CC-" in x
                         for x in lines)
    assert len(lines) == sum(1 for x in p.stdout.splitlines() if x.startswith("scontrol"))


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    p = run_cli("quarantine", "--format", "slurm", "--db", str(tmp_path / "none.db"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    db = tmp_path / "r.db"
    store_runs(db, 8, 1)
    p = run_cli("quarantine", "--format", "k8s", "--db", str(db), "--run", "nope")
    assert p.returncode == 2 and "no run 'nope'" in p.stderr
    p = run_cli("quarantine", "--format", "hosts", "--db", str(db))
    assert p.returncode == 0 and p.stdout == ""  # a clean fleet: nothing to take out
