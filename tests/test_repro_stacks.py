"""Training-loop pieces nobody here wrote, under capture: mixed precision (autocast + GradScaler),
activation checkpointing (reentrant and not), gradient clipping. Capture must not change the step, a
clean step replays clean against float64, and a bit flipped in one GEMM is still found."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from chipcheck.probes import faults
from chipcheck.reproducers import capture
from chipcheck.reproducers import format as fmt
from chipcheck.reproducers import replay as rp

X = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
Step = Callable[[torch.nn.Sequential, torch.optim.Optimizer], None]


def _model() -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 4))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def _amp(m: torch.nn.Sequential, opt: torch.optim.Optimizer) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(X).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def _checkpointed(m: torch.nn.Sequential, opt: torch.optim.Optimizer) -> None:
    h = checkpoint(m[0], X, use_reentrant=False)
    m[3](m[2](m[1](h))).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _reentrant(m: torch.nn.Sequential, opt: torch.optim.Optimizer) -> None:
    h = checkpoint(lambda t: m[1](m[0](t)), X.clone().requires_grad_(), use_reentrant=True)
    m[3](m[2](h)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _clipped(m: torch.nn.Sequential, opt: torch.optim.Optimizer) -> None:
    m(X).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("step", [_amp, _checkpointed, _reentrant, _clipped], ids=lambda f: f.__name__.strip("_"))
def test_capture_leaves_the_step_as_it_was_and_replays_clean(step: Step, tmp_path: Path) -> None:
    torch.manual_seed(5)  # dropout draws: both runs from the same RNG state
    bare, bare_opt = _model()
    torch.manual_seed(5)
    step(bare, bare_opt)
    m, opt = _model()
    torch.manual_seed(5)
    with capture(tmp_path / "cap"):
        step(m, opt)
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), m.parameters(), strict=True))
    res = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64")
    assert res.divergence is None and res.capture_mismatch is None
    if step is _amp:  # AMP's unscale and scale update take float32 only: not compared, said so, not a crash
        assert [n.split(":")[0] for n in res.not_compared] == [
            f"op #{o.index} {o.op}" for o in fmt.load(tmp_path / "cap").ops if o.op.startswith("aten._amp_")]
        assert len(res.not_compared) == 2
    else:
        assert res.not_compared == []


def test_a_flipped_bit_in_a_mixed_precision_step_is_found_past_the_ops_the_reference_cannot_run(tmp_path: Path) -> None:
    spec = "bitflip:rank=0,bit=25,op=addmm,after=2,count=1,at=call"  # the next forward's first GEMM
    m, opt = _model()
    with faults.make_injector(faults.parse(spec), 0, "repro")():
        with capture(tmp_path / "cap"):
            _amp(m, opt)
            m(X).sum().item()  # the next step's forward reads the (scaled, unscaled) update
    res = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64", inject=spec)
    amp = [o.index for o in fmt.load(tmp_path / "cap").ops if o.op.startswith("aten._amp_")]
    assert res.divergence is not None and res.divergence.op == "aten.addmm.default", res.divergence
    assert len(amp) == 2 and res.divergence.index > max(amp) and len(res.not_compared) == 2


def _norm_on_bf16(tmp_path: Path, spec: str | None = None) -> rp.ReplayResult:
    # under CPU autocast a LayerNorm takes the bfloat16 activations as they are, with its float32 weight:
    # the mixed kernel's float32 weight and bias gradients are summed at bfloat16 precision (3e-3 of
    # their terms), past float32's tolerance
    torch.manual_seed(0)
    lin, ln, head = torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)
    x = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(1))
    with faults.make_injector(faults.parse(spec), 0, "repro")() if spec else contextlib.nullcontext():
        with capture(tmp_path / "cap"), torch.autocast("cpu", dtype=torch.bfloat16):
            head(ln(lin(x))).float().pow(2).mean().backward()
    return rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64", inject=spec)


def test_a_norm_on_bfloat16_activations_with_float32_weights_replays_clean(tmp_path: Path) -> None:
    res = _norm_on_bf16(tmp_path)
    assert "aten.native_layer_norm_backward.default" in [o.op for o in fmt.load(tmp_path / "cap").ops]
    assert res.divergence is None, res.divergence  # the kernel's precision is its bfloat16 inputs'


def test_a_flipped_exponent_bit_in_that_mixed_norm_is_still_found(tmp_path: Path) -> None:
    # judged at bfloat16's tolerance now, as a bfloat16 output is: a flip that scales an element up
    # (bit 30: x 2**128) is found; one that shrinks a small element toward zero may pass, as it would there
    spec = "bitflip:rank=0,bit=30,op=native_layer_norm_backward,output=1,at=call"
    res = _norm_on_bf16(tmp_path, spec)
    assert res.divergence is not None and res.divergence.op == "aten.native_layer_norm_backward.default"
    assert res.divergence.output == 1 and 30 in res.divergence.metric.flipped_bits, res.divergence
