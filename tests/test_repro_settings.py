"""Settings shrink too: repro.py sets only the bit-changing settings the failure needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import run_cli

from chipcheck.reproducers import capture, emit
from chipcheck.reproducers import settings as st
from chipcheck.reproducers import shrink as sk

RECORDED = {"deterministic_algorithms": True, "num_threads": 1, "float32_matmul_precision": "high",
            "default_dtype": "float32", "cudnn_benchmark": False}


def test_only_the_settings_the_failure_needs_are_kept() -> None:
    tried: list[dict] = []

    def fails(s: dict) -> bool:  # a failure that shows only with TF32-like matmuls ("high")
        tried.append(s)
        return s.get("float32_matmul_precision") == "high"

    assert st.differs(RECORDED) == {"deterministic_algorithms": True, "num_threads": 1,
                                    "float32_matmul_precision": "high"}  # defaults cannot matter
    assert st.shrink(RECORDED, fails) == {"float32_matmul_precision": "high"}
    assert len(tried) == 3  # one try per setting that differs from torch's default
    assert st.shrink(RECORDED, lambda s: True) == {}  # a failure that needs none


def test_settings_are_applied_inside_and_the_process_keeps_its_own() -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
              torch.get_float32_matmul_precision())
    with st.applied({"deterministic_algorithms": True, "num_threads": 1, "float32_matmul_precision": "high"}):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        assert torch.get_float32_matmul_precision() == "high"
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
            torch.get_float32_matmul_precision()) == before


def test_a_cpu_failure_needs_none_of_the_recorded_settings_and_the_file_sets_what_it_is_given(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 7
    torch.use_deterministic_algorithms(True)
    try:
        with capture(root):
            (w @ w).relu().sum()
    finally:
        torch.use_deterministic_algorithms(False)
    spec = "bitflip:rank=0,bit=25,op=mm,at=call"
    r = sk.shrink_capture(str(root), inject=spec)
    # on this CPU no setting changes the bits of an mm: every one is dropped, and said to be
    assert r.settings == {} and "deterministic_algorithms" in r.recorded and "num_threads" in r.recorded
    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(root), "--inject", spec, "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "Settings: none (not needed, dropped: deterministic_algorithms, num_threads)" in out.read_text()
    # a file given settings sets them before it runs the op
    text = emit.render_op(r.case, device="cpu", metric_line=r.metric.line(),
                          settings={"deterministic_algorithms": True, "num_threads": 1}, recorded=r.recorded)
    f = tmp_path / "with_settings.py"
    f.write_text(text)
    run = subprocess.run([sys.executable, str(f)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "settings: deterministic_algorithms=True, num_threads=1" in run.stdout, run.stderr
