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


def _step(device: str = "cpu") -> tuple[torch.nn.Module, torch.Tensor, object]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(device)
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


GELU_FAULT = "bitflip:rank=0,bit=25,op=gelu,at=call"  # the chip's GELU math is wrong, wherever it runs


def test_a_fault_in_a_fused_kernel_is_missed_compiled_and_found_when_the_step_is_captured_eagerly(tmp_path: Path) -> None:
    """The GELU between the GEMMs is fused in the compiled step: a chip that gets GELU wrong passes a
    compiled capture's replay (with the note). `capture(..., eager=True)` runs the same compiled module
    op by op: the GELU is recorded and its bad output named; afterwards the module runs compiled again."""
    pytest.importorskip("torch._inductor")
    m, x, cm = _step()
    cm(x)  # type: ignore[operator]
    with faults.make_injector(faults.parse(GELU_FAULT), 0, "repro")():
        with capture(tmp_path / "compiled") as c:
            cm(x)  # type: ignore[operator]
        assert c.result is not None and c.result.compiled_calls == 1 and not c.result.eager
        with capture(tmp_path / "eager", eager=True) as c:
            bad = cm(x)  # type: ignore[operator]
        assert c.result is not None and c.result.compiled_calls == 0 and c.result.eager
    missed = rp.replay(fmt.load(tmp_path / "compiled"), reference="cpu64", inject=GELU_FAULT)
    assert missed.divergence is None  # the false clean bill the note warns of
    cap = fmt.load(tmp_path / "eager")
    assert cap.eager and "aten.gelu.default" in [o.op for o in cap.ops]
    found = rp.replay(cap, reference="cpu64", inject=GELU_FAULT)
    assert found.divergence is not None and cap.ops[found.divergence.index].op == "aten.gelu.default"
    assert found.divergence.metric.cls == "wrong"
    assert not torch.equal(bad, m(x))  # the eager capture ran on the bad chip
    healthy = rp.replay(cap, reference="cpu64")  # a healthy chip agrees; the bad chip's recorded bits do not
    assert healthy.divergence is None and healthy.capture_mismatch > 0
    with capture(tmp_path / "after") as c:  # the stance is put back: compiled again
        cm(x)  # type: ignore[operator]
    assert c.result is not None and c.result.compiled_calls == 1 and not c.result.eager
    p = run_cli("repro", "shrink", str(tmp_path / "eager"), "--reference", "cpu64", "--inject", GELU_FAULT,
                "-o", str(tmp_path / "r.py"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "aten.gelu" in (tmp_path / "r.py").read_text()


def test_an_eager_capture_that_cannot_start_leaves_torch_compile_as_it_was(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A with-statement whose __enter__ raises never calls __exit__: the capture must undo its
    force_eager stance itself, or every compiled step after it would silently run eagerly."""
    import importlib

    import torch._dynamo.eval_frame as ef

    cap_mod = importlib.import_module("chipcheck.reproducers.capture")  # the package exports the class

    def fail(self: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(cap_mod.Recorder, "__enter__", fail)
    before = ef._stance
    with pytest.raises(OSError, match="no space"):
        with capture(tmp_path / "c", eager=True):
            pass
    assert ef._stance == before and ef._stance.stance == "default"


def test_the_flight_recorder_recaptures_a_compiled_step_eagerly(tmp_path: Path) -> None:
    """A compiled training step goes wrong in a fused kernel: `recapture(..., eager=True)` re-runs its
    snapshot op by op, and the capture names the GELU."""
    pytest.importorskip("torch._inductor")
    from chipcheck.reproducers.flight import FlightRecorder

    m, x, cm = _step()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def train_step(batch: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = cm(batch).square().mean()  # type: ignore[operator]
        loss.backward()
        opt.step()
        return loss.detach()

    rec = FlightRecorder(m, opt)
    for _ in range(2):
        with rec.step(x):
            train_step(x)
    with faults.make_injector(faults.parse(GELU_FAULT), 0, "repro")():
        where = rec.recapture(train_step, tmp_path / "out", eager=True)
    assert where is not None
    cap = fmt.load(where)
    assert cap.eager and cap.compiled_calls == 0
    res = rp.replay(cap, reference="cpu64", inject=GELU_FAULT)
    assert res.divergence is not None and cap.ops[res.divergence.index].op == "aten.gelu.default"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_a_gpu_compiled_graphs_are_counted_and_an_eager_capture_checks_their_kernels(tmp_path: Path) -> None:
    """The same on CUDA, where inductor's fused kernels are Triton's and its GEMMs cuBLAS calls."""
    pytest.importorskip("triton")
    _, x, cm = _step("cuda")
    cm(x)  # type: ignore[operator]
    with capture(tmp_path / "compiled") as c:
        cm(x).sum().backward()  # type: ignore[operator]
    assert c.result is not None and c.result.compiled_calls == 2 and c.result.device.startswith("cuda")
    assert rp.replay(fmt.load(tmp_path / "compiled"), reference="cpu64").divergence is None
    with faults.make_injector(faults.parse(GELU_FAULT), 0, "repro")():
        with capture(tmp_path / "eager", eager=True):
            cm(x)  # type: ignore[operator]
    cap = fmt.load(tmp_path / "eager")
    assert cap.eager and cap.compiled_calls == 0
    res = rp.replay(cap, reference="cpu64", inject=GELU_FAULT)
    assert res.divergence is not None and cap.ops[res.divergence.index].op == "aten.gelu.default"
