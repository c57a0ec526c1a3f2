"""Settings shrink too: repro.py sets only the bit-changing settings the failure needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import run_cli

from chipcheck.reproducers import capture, emit
from chipcheck.reproducers import settings as st
from chipcheck.reproducers import shrink as sk
from chipcheck.reproducers import verify as vf

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


def test_a_cpu_failure_needs_none_of_the_recorded_settings_and_the_file_sets_what_it_is_given(
        tmp_path: Path, monkeypatch) -> None:
    for name in st.ENV_VARS:  # the dropped list below is exact: no environment of the shell running the tests
        monkeypatch.delenv(name, raising=False)
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


def test_the_sdpa_backends_and_the_bit_changing_environment_are_recorded(monkeypatch) -> None:
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setenv("HOME_OF_NO_INTEREST", "x")
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        s = st.current()
        with st.applied({"sdp_flash": True}):
            assert torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()  # the process's own again
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    assert s["sdp_flash"] is False and s["sdp_math"] is True
    assert s["env:NCCL_ALGO"] == "Tree" and s["env:CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not any("HOME_OF_NO_INTEREST" in k for k in s)
    # only what differs from torch's defaults can matter; an environment variable always can
    assert st.differs(s).keys() >= {"sdp_flash", "env:NCCL_ALGO", "env:CUBLAS_WORKSPACE_CONFIG"}
    assert "sdp_math" not in st.differs(s)
    # the in-process shrink cannot undo an environment variable: it keeps them for the file runs
    assert st.shrink(s, lambda _s: True) == {"env:CUBLAS_WORKSPACE_CONFIG": ":4096:8", "env:NCCL_ALGO": "Tree"}


def test_an_environment_variable_is_kept_only_when_the_file_passes_without_it(monkeypatch) -> None:
    # the file fails only with NCCL_ALGO=Tree; the shrinking process has it set too, so a file that
    # did not clear what it does not set would still fail without it and drop a variable it needs
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    monkeypatch.setenv("MKL_CBWR", "AVX2")

    def render(s: dict) -> str:
        return emit._environment(s) + "import sys\nsys.exit(1 if os.environ.get('NCCL_ALGO') == 'Tree' else 0)\n"

    recorded = {"env:NCCL_ALGO": "Tree", "env:MKL_CBWR": "AVX2", "num_threads": 1}
    kept, runs = vf.shrink_env(render, recorded, suspect="cpu", hook=None)
    assert kept == {"env:NCCL_ALGO": "Tree", "num_threads": 1}
    assert [(k, r.rc) for k, r in runs] == [("env:MKL_CBWR", 1), ("env:NCCL_ALGO", 0)]  # MKL_CBWR dropped (still fails), NCCL_ALGO kept (passes without)


def test_a_capture_under_an_unneeded_environment_variable_gives_a_file_without_it(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    code = ("import sys, torch\nfrom chipcheck.reproducers import capture\n"
            "w = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 7\n"
            f"with capture({str(root)!r}):\n    (w @ w).relu().sum()\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)
    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(root), "--inject", "bitflip:rank=0,bit=25,op=mm,at=call", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "ATEN_CPU_CAPABILITY=default: not needed, dropped (the file still fails without it)" in p.stdout
    text = out.read_text()
    assert "dropped: env:ATEN_CPU_CAPABILITY" in text and "ENV = {}" in text
