"""Shrink when the failure needs history: a fault that spares the first two matmuls of the step (a chip
that fails after warming up) does not reproduce on the divergent op alone; suffix bisection and ddmin over
the op list (cut at recorded values) keep the two earlier matmuls, and the emitted multi-op repro.py
reproduces only with the same fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.probes import faults
from chipcheck.reproducers import capture, emit
from chipcheck.reproducers import format as fmt
from chipcheck.reproducers import shrink as sk

MC = GPTConfig.tiny()
# the third mm of rank 0's step (the forward's): bit 25 is an fp32 exponent bit
SPEC = "bitflip:rank=0,bit=25,op=mm,after=2,count=1,at=call"


@pytest.fixture(scope="module")
def history_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hcap") / "cap"
    tr = Trainer(MC, TrainConfig(), seed=5)
    x, y = data.batch(MC, 5, 0, batch_size=8)
    inj = faults.make_injector(faults.parse(SPEC), 0, "model_step")
    with inj():  # the injector below the recorder, as in test_replay_shrink
        with capture(root):
            tr.step(x, y)
    return root


def test_history_shrink_keeps_three_ops_and_the_repro_needs_them(history_capture: Path, tmp_path: Path) -> None:
    r = sk.shrink_capture(str(history_capture), reference="cpu64", inject=SPEC, live_inject=True, repeats=1)
    third_mm = [o.index for o in fmt.load(history_capture).ops if o.op == "aten.mm.default"][2]
    assert r.divergence.index == third_mm
    assert r.history and r.ops <= 3 and r.ops == len(r.history) + 1  # the "at most 3 ops"
    assert [c.op for c in r.history] == ["aten.mm.default"] * 2 and r.case.op == "aten.mm.default"
    assert r.metric.signature() == ("wrong", 25)
    assert r.seconds < 60
    path = tmp_path / "repro.py"
    path.write_text(emit.render_ops(r.history, r.case, device="cpu", metric_line=r.metric.line(), where=r.stack))
    src = path.read_text()
    assert "chipcheck" not in src.split('"""', 2)[2].replace("chipcheck reproducer", "")  # no chipcheck import
    bad = subprocess.run([sys.executable, str(path), "--inject", SPEC, "--repeat", "2"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "REPRODUCED: 2 of 2" in bad.stdout and "25: 1" in bad.stdout
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    later = subprocess.run([sys.executable, str(path), "--inject", SPEC.replace("after=2", "after=3")],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert later.returncode == 0, later.stdout + later.stderr  # the fault lands past the last op


def test_history_candidates_are_cut_at_recorded_values(history_capture: Path) -> None:
    cap = fmt.load(history_capture)
    mms = [o.index for o in cap.ops if o.op == "aten.mm.default"]
    prior = sk.prefix_cases(cap, mms[2], device="cpu", inject=SPEC)
    assert sum(c.op == "aten.mm.default" for c in prior) == 2
    assert all(i.kind == "data" and i.data is not None for c in prior for i in c.inputs)


def test_cli_shrink_live_inject_writes_a_multi_op_repro(history_capture: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(history_capture), "--inject", SPEC, "--live-inject", "--repeat", "1",
                "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "after 2 earlier ops" in p.stdout and "wrote" in p.stdout
    r = subprocess.run([sys.executable, str(out), "--inject", SPEC], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr


def test_an_intermittent_failure_that_needs_history_gets_a_trial_plan(history_capture: Path, tmp_path: Path) -> None:
    """The same warm-up fault, hitting only half the time: the whole prefix is measured first, every
    candidate gets the planned trials (too few would drop a needed op as "not failing"), and the
    file runs the plan by default and reproduces with the fault, never without it."""
    spec = SPEC.replace("at=call", "at=call,chance=0.5,seed=3")
    r = sk.shrink_capture(str(history_capture), reference="cpu64", inject=spec, live_inject=True, repeats=1,
                          passes=8)
    assert [c.op for c in r.history] == ["aten.mm.default"] * 2 and r.case.op == "aten.mm.default"
    assert r.rate is not None and r.rate.intermittent and 1 < r.rate.plan <= 200, r.rate
    path = tmp_path / "repro.py"
    path.write_text(emit.render_ops(r.history, r.case, device="cpu", metric_line=r.metric.line(), where=r.stack,
                                    rate=r.rate))
    assert f"--repeat {r.rate.plan} by default" in path.read_text()
    bad = subprocess.run([sys.executable, str(path), "--inject", spec], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert bad.returncode == 1 and f"of {r.rate.plan}" in bad.stdout, bad.stdout + bad.stderr
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
