"""A torch.compile'd model under capture: it must run as compiled (under a plain dispatch mode
torch.compile falls back to eager, which computes other bits: capture changed the step), its GEMMs
(the extern kernels the compiled artifact calls) are recorded and replayed, and a bit flipped in one of
them on a bad chip is found. Fused kernels are opaque: their outputs are recorded as inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from chipcheck.probes import faults
from chipcheck.reproducers import capture
from chipcheck.reproducers import format as fmt
from chipcheck.reproducers import replay as rp

FAULT = "bitflip:rank=0,bit=25,op=addmm,after=1,count=1,at=call"


def _step() -> tuple[torch.nn.Module, torch.Tensor, object]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    return m, x, torch.compile(m)


def test_a_compiled_step_runs_as_compiled_under_capture_and_its_gemms_replay(tmp_path: Path) -> None:
    pytest.importorskip("torch._inductor")
    m, x, cm = _step()
    compiled = cm(x)  # type: ignore[operator]
    assert not torch.equal(compiled, m(x))  # the compiled kernels' bits differ from eager here
    with capture(tmp_path / "cap") as c:
        captured = cm(x)  # type: ignore[operator]
    assert torch.equal(captured, compiled), "capture changed the compiled step's result"
    assert c.result is not None and [o.op for o in c.result.ops] == ["aten.addmm.out", "aten.addmm.out"]
    clean = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64")
    assert clean.divergence is None
    # a bad chip: its second GEMM of the compiled forward flips a bit
    with faults.make_injector(faults.parse(FAULT), 0, "repro")():
        with capture(tmp_path / "bad"):
            bad = cm(x)  # type: ignore[operator]
    assert not torch.equal(bad, compiled)
    res = rp.replay(fmt.load(tmp_path / "bad"), reference="cpu64", inject=FAULT)
    gemms = [o.index for o in fmt.load(tmp_path / "bad").ops if o.op == "aten.addmm.out"]
    assert res.divergence is not None and res.divergence.index == gemms[1]  # the second GEMM, as injected
    assert res.divergence.metric.cls == "wrong" and res.divergence.metric.bad == 1


def test_a_capture_says_how_many_compiled_graphs_ran_kernels_it_did_not_check(tmp_path: Path) -> None:
    """A fault inside a fused kernel (the GELU between the GEMMs) is in no recorded op: replay could only
    say "every op agrees". The capture counts the compiled graphs that ran, and replay and shrink say so."""
    pytest.importorskip("torch._inductor")
    import torch._inductor.debug as debug

    m, x, cm = _step()
    cm(x)  # type: ignore[operator]  # compiled before the capture, as in a training loop
    with capture(tmp_path / "cap") as c:
        y = cm(x)  # type: ignore[operator]
        y.sum().backward()  # the compiled backward is a second graph
    assert c.result is not None and c.result.compiled_calls == 2
    assert fmt.load(tmp_path / "cap").compiled_calls == 2  # kept in capture.json
    assert debug.RECORD_GRAPH_EXECUTION is False and debug.GRAPH_EXECUTION_ORDER is None  # put back
    p = run_cli("repro", "replay", str(tmp_path / "cap"), "--reference", "cpu64")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "note: 2 torch.compile'd graph call(s) ran fused kernels outside the dispatcher" in p.stdout
    p = run_cli("repro", "shrink", str(tmp_path / "cap"), "--reference", "cpu64", "-o", str(tmp_path / "r.py"))
    assert p.returncode == 2 and "not checked" in p.stderr, p.stderr  # nothing to shrink, and why it may miss
    with capture(tmp_path / "eager") as c:  # the same module run eagerly: every kernel is an ATen op
        m(x).sum().backward()
    assert c.result is not None and c.result.compiled_calls == 0
    p = run_cli("repro", "replay", str(tmp_path / "eager"), "--reference", "cpu64")
    assert p.returncode == 0 and "note:" not in p.stdout, p.stdout
