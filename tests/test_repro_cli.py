"""`chipcheck repro replay|shrink|bundle` in real subprocesses: exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.probes import faults
from chipcheck.reproducers import capture

MC = GPTConfig.tiny()
SPEC = "bitflip:rank=0,bit=25,op=mm,after=12,count=1,at=call"


@pytest.fixture(scope="module")
def cap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "cap"
    tr = Trainer(MC, TrainConfig(), seed=6)
    x, y = data.batch(MC, 6, 0, batch_size=4)
    inj = faults.make_injector(faults.parse(SPEC), 0, "model_step")
    with inj():
        with capture(root):
            tr.step(x, y)
    return root


def test_replay_names_the_first_divergent_op_exit_1(cap_dir: Path) -> None:
    p = run_cli("repro", "replay", str(cap_dir), "--reference", "cpu64", "--inject", SPEC)
    assert p.returncode == 1, p.stderr
    assert "first divergent op" in p.stdout and "aten.mm.default" in p.stdout and "25x1" in p.stdout
    clean = run_cli("repro", "replay", str(cap_dir), "--reference", "cpu")
    assert clean.returncode == 0 and "every op agrees" in clean.stdout
    assert "differs from the captured bits" in clean.stdout  # the capture saw the bad chip


def test_shrink_then_bundle_redacted(cap_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(cap_dir), "--inject", SPEC, "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert out.exists() and "wrote" in p.stdout
    r = subprocess.run([sys.executable, str(out), "--inject", "bitflip:bit=25"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    b = tmp_path / "bundle.tar.gz"
    p = run_cli("repro", "bundle", str(out), "--redact", "-o", str(b))
    assert p.returncode == 0, p.stderr
    with tarfile.open(b) as tar:
        names = tar.getnames()
        repro = tar.extractfile("bundle/repro.py").read().decode()  # type: ignore[union-attr]
        readme = tar.extractfile("bundle/README.md").read().decode()  # type: ignore[union-attr]
    assert {"bundle/repro.py", "bundle/env.json", "bundle/README.md", "bundle/inputs.sha256",
            "bundle/history.json"} <= set(names)
    assert "gpt.py" not in repro and "/work" not in repro and "Seen at" not in repro
    assert "python repro.py --device cpu" in readme and "Passes on" in readme


def test_bad_capture_and_non_failing_case_exit_2(cap_dir: Path, tmp_path: Path) -> None:
    p = run_cli("repro", "replay", str(tmp_path / "missing"))
    assert p.returncode == 2 and "not a capture directory" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("repro", "shrink", str(cap_dir), "-o", str(tmp_path / "r.py"))  # no fault: nothing fails
    assert p.returncode == 2 and "nothing to shrink" in p.stderr
    p = run_cli("repro", "replay", str(cap_dir), "--reference", "tpu:9")
    assert p.returncode == 2 and "--reference" in p.stderr
    p = run_cli("repro", "replay", str(cap_dir), "--rank", "3")
    assert p.returncode == 2 and "no rank 3 in this capture (ranks captured: 0)" in p.stderr, p.stderr
