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


def _nested_step(pad: torch.Tensor) -> torch.Tensor:
    # an encoder in eval with a padding mask takes torch's fast path: nested tensors, a fused layer
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = enc(x, src_key_padding_mask=pad)
        h.add_(1.0)  # in place, on the strided tensor the unrecorded ops made
        return (h @ w).sum(0)


def test_a_step_on_nested_tensors_runs_as_it_would_and_says_what_it_could_not_record(tmp_path: Path) -> None:
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 5:] = True
    bare = _nested_step(pad)
    with capture(tmp_path / "cap"):  # before: "NestedTensorImpl doesn't support sizes" broke the step
        out = _nested_step(pad)
    assert torch.equal(bare, out)
    cap = fmt.load(tmp_path / "cap")
    assert cap.unrecorded >= 2 and "nested tensor" in cap.unrecorded_why
    assert "ran unrecorded" in rp.unchecked_note(cap)
    res = rp.replay(cap, reference="cpu64")
    assert res.divergence is None and res.capture_mismatch is None
    assert "aten.mm.default" in [o.op for o in cap.ops]
    # the recorded ops around the unrecorded ones are still checked: a fault in the GEMM after is found
    spec = "bitflip:rank=0,bit=25,op=mm,at=call"
    with faults.make_injector(faults.parse(spec), 0, "repro")():
        with capture(tmp_path / "bad"):
            _nested_step(pad)
    bad = rp.replay(fmt.load(tmp_path / "bad"), reference="cpu64", inject=spec)
    assert bad.divergence is not None and "mm" in bad.divergence.op, bad.divergence


def test_what_an_unrecorded_op_writes_in_place_is_read_back_not_recomputed(tmp_path: Path) -> None:
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))
    sparse = (torch.eye(4) * 3).to_sparse()
    with capture(tmp_path / "cap"):
        b = a * 2
        b.addmm_(sparse, a)  # a sparse GEMM into b: not recordable, and it changes b
        b.sum()
    cap = fmt.load(tmp_path / "cap")
    assert cap.unrecorded == 1 and "sparse_coo tensor" in cap.unrecorded_why
    # the sum reads b as the sparse GEMM left it (saved bytes), not as `mul` made it
    res = rp.replay(cap, reference="cpu64")
    assert res.capture_mismatch is None and res.divergence is None


def test_an_op_on_a_packed_quantized_weight_is_not_recorded_and_the_ops_around_it_are(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 4)
    body = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 4)).eval(),
                                                  {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(tmp_path / "cap"):
        head(body(x)).relu()
    cap = fmt.load(tmp_path / "cap")  # before: replay called the capture defective and made nothing
    assert cap.unrecorded == 1 and "packed LinearPackedParamsBase" in cap.unrecorded_why
    assert "aten.addmm.default" in [o.op for o in cap.ops]
    res = rp.replay(cap, reference="cpu64")
    assert res.divergence is None and res.capture_mismatch is None
