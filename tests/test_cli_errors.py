"""Bad input: one clear line, exit 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_cli

from chipcheck.cli import main


@pytest.mark.parametrize("args, words", [
    (["--devices", "tpu:9"], "unknown device spec"),
    (["--devices", "cpu:zero"], "cpu:N needs a count"),
    (["--devices", "cuda:0,0"], "distinct"),
    (["--devices", "cuda:7"], "no CUDA device 7"),
    (["--probes", "matmul,teleport"], "unknown probe 'teleport'"),
    (["--inject", "bitflip:rank=1"], "needs bit"),
    (["--inject", "melt:rank=1"], "unknown fault kind"),
    (["--inject", "slow:rank=3,factor=1.5"], "rank 3 is not in this run (its only rank is 0)"),  # ran clean, silently
    (["--devices", "cpu:2", "--inject", "bitflip:rank=0,bit=3,peer=2"], "rank 2 is not in this run"),
    (["--probes", "matmul", "--inject", "bitflip:rank=0,bit=3,probe=matmulx"], "probe 'matmulx' is not in this run"),
    (["--inject", "bitflip:rank=0,bit=3,op=mmx"], "op 'mmx' is no ATen or c10d operator"),
    (["--profile", "forever"], "unknown profile"),
    (["--profile", "burnin"], "needs --duration"),
    (["--timeout", "-1"], "--timeout must be > 0"),
    (["--min-gap", "2"], "--min-gap"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    db = tmp_path / "r.db"
    p = run_cli("run", "--db", str(db), "--devices", "cpu:1", *args) if "--devices" not in args else \
        run_cli("run", "--db", str(db), *args)
    assert p.returncode == 2, p.stderr
    assert words in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    if db.exists():  # nothing half-written: no run was started
        assert sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_corrupt_database(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    db.write_bytes(os.urandom(8192))
    p = run_cli("run", "--db", str(db), "--devices", "cpu:1")
    assert p.returncode == 2 and "not a usable chipcheck database" in p.stderr and "Traceback" not in p.stderr


def test_unwritable_database_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run_cli("run", "--db", str(blocker / "r.db"), "--devices", "cpu:1")
    assert p.returncode == 2 and "cannot create the directory" in p.stderr


def test_unwritable_json_path(tmp_path: Path) -> None:
    p = run_cli("run", "--db", str(tmp_path / "r.db"), "--devices", "cpu:1", "--json", str(tmp_path / "no" / "x.json"))
    assert p.returncode == 2 and "does not exist" in p.stderr


@pytest.mark.parametrize("flag", [["--json"], ["--report", "html="]])
def test_an_output_only_root_is_told_it_may_write_is_refused_before_the_run(tmp_path: Path, flag: list[str]) -> None:
    # /proc: access(2) tells root it may write there; the file cannot be created. The run measured
    # everything and then ended in a traceback at the JSON write (exit 1, as if a device had failed)
    where = "/proc/chipcheck-out.json"
    args = [flag[0], where] if len(flag) == 1 else [flag[0], flag[1] + where]
    p = run_cli("run", "--db", str(tmp_path / "r.db"), "--devices", "cpu:1", "--probes", "matmul", *args)
    assert p.returncode == 2 and f"{where} is not writable" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.db").exists()  # refused before the store: nothing ran


def test_an_output_that_fails_after_the_run_is_one_line_naming_where_the_results_are(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chipcheck.cli.common import write_output

    gone = tmp_path / "gone" / "run.json"  # its directory removed while the run measured
    with pytest.raises(SystemExit) as e:
        write_output(gone, "{}", "--json", "; the run's results are in r.db")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"chipcheck: error: --json {gone}: cannot be written (No such file or directory); " \
                  "the run's results are in r.db\n"
    with pytest.raises(SystemExit):
        write_output(tmp_path, "{}", "-o")  # a directory
    assert "cannot be written (Is a directory)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_unknown_flag_is_a_click_usage_error() -> None:
    r = CliRunner().invoke(main, ["run", "--frobnicate"])
    assert r.exit_code == 2 and "No such option" in r.output


def test_list_json_describes_cpu_devices() -> None:
    p = run_cli("list", "--devices", "cpu:3", "--json")
    assert p.returncode == 0, p.stderr
    devs = json.loads(p.stdout)
    assert [d["index"] for d in devs] == [0, 1, 2]
    d = devs[0]
    assert d["kind"] == "cpu" and d["host"] and d["memory_bytes"] > 0 and d["uuid"]
    assert {"sku", "isa", "torch", "threads"} <= set(d["fingerprint_fields"])
    assert len({x["fingerprint"] for x in devs}) == 1


def test_killing_a_run_keeps_what_was_measured(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    proc = subprocess.Popen([sys.executable, "-m", "chipcheck.cli", "run", "--db", str(db), "--devices", "cpu:2",
                             "--probes", "matmul", "--profile", "standard", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and n < 3:
        time.sleep(0.5)
        if db.exists():
            try:
                n = sqlite3.connect(db).execute("SELECT count(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert n >= 3
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM results").fetchone()[0] >= 3
    body = json.loads(con.execute("SELECT body FROM results LIMIT 1").fetchone()[0])
    assert body["settings"]["deterministic_algorithms"] is True and "threads" in body["settings"]
