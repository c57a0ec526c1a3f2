"""`chipcheck repro shrink|bundle` output and input paths (issue 20, item 9): a path that cannot be
used is one line and exit 2 before any work; `--redact` leaves no host name in the bundle."""

from __future__ import annotations

import json
import platform
import tarfile
import time
from pathlib import Path

import pytest
from conftest import run_cli

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.reproducers import capture


@pytest.fixture(scope="module")
def cap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paths") / "cap"
    mc = GPTConfig.tiny()
    tr = Trainer(mc, TrainConfig(), seed=3)
    x, y = data.batch(mc, 3, 0, batch_size=2)
    with capture(root):
        tr.step(x, y)
    return root


def _one_line_exit_2(p) -> None:  # type: ignore[no-untyped-def]
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("chipcheck: error:")


def test_shrink_to_a_missing_directory_fails_before_shrinking(cap_dir: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = run_cli("repro", "shrink", str(cap_dir), "--inject", "bitflip:rank=0,bit=25,op=mm,count=1",
                "-o", str(tmp_path / "missing" / "dir" / "r.py"))
    took = time.monotonic() - t0
    _one_line_exit_2(p)
    assert "does not exist" in p.stderr and "-o" in p.stderr
    assert "candidates" not in p.stdout  # no shrink ran
    assert took < 60, took  # the CLI's start-up only


def test_shrink_to_a_directory_fails_at_once(cap_dir: Path, tmp_path: Path) -> None:
    p = run_cli("repro", "shrink", str(cap_dir), "-o", str(tmp_path))
    _one_line_exit_2(p)
    assert "is a directory" in p.stderr


def test_bundle_missing_input_repro_or_output_directory(cap_dir: Path, tmp_path: Path) -> None:
    repro = tmp_path / "repro.py"
    repro.write_text("print('hi')\n")
    _one_line_exit_2(run_cli("repro", "bundle", str(tmp_path / "nope"), "-o", str(tmp_path / "b.tar.gz")))
    _one_line_exit_2(run_cli("repro", "bundle", str(repro), "-o", str(tmp_path / "missing" / "b.tar.gz")))
    p = run_cli("repro", "bundle", str(cap_dir), "--repro", str(tmp_path / "missing.py"), "-o",
                str(tmp_path / "b.tar.gz"))
    _one_line_exit_2(p)
    assert "--repro" in p.stderr
    assert not (tmp_path / "b.tar.gz").exists()


def test_redacted_bundle_of_a_capture_holds_no_host_name(cap_dir: Path, tmp_path: Path) -> None:
    host = platform.node()
    repro = tmp_path / "repro.py"
    repro.write_text(f"# shrunk on {host}\nprint('hi')\n")
    out = tmp_path / "b.tar.gz"
    p = run_cli("repro", "bundle", str(cap_dir), "--repro", str(repro), "--redact", "-o", str(out))
    assert p.returncode == 0, p.stderr
    with tarfile.open(out) as tar:
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]
    env = json.loads(texts["bundle/env.json"])
    assert "capture" in env and "host" not in env["capture"]["env"] and "host" not in env["software"]
    for name, text in texts.items():
        assert host not in text, name
    # without --redact the capture's host is kept (the redaction is what removed it)
    plain = tmp_path / "plain.tar.gz"
    assert run_cli("repro", "bundle", str(cap_dir), "--repro", str(repro), "-o", str(plain)).returncode == 0
    with tarfile.open(plain) as tar:
        env = json.loads(tar.extractfile("bundle/env.json").read())  # type: ignore[union-attr]
    assert env["capture"]["env"]["host"] == host
