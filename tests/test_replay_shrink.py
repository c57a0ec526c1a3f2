"""Replay and shrink end to end on the model step with one injected fault, and the shrinker's
generic machinery on known failing cases (exact minima)."""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.probes import faults
from chipcheck.reproducers import capture, emit, verify
from chipcheck.reproducers import format as fmt
from chipcheck.reproducers import replay as rp
from chipcheck.reproducers import shrink as sk
from chipcheck.reproducers import tolerance as tol
from chipcheck.reproducers.terms import cancelling_terms

MC = GPTConfig.tiny()
# one matmul of rank 0's backward (the forward has 9 mm calls): bit 25 is an fp32 exponent bit
SPEC = "bitflip:rank=0,bit=25,op=mm,after=12,count=1,at=call"


@pytest.fixture(scope="module")
def faulty_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cap") / "cap"
    tr = Trainer(MC, TrainConfig(), seed=5)
    x, y = data.batch(MC, 5, 0, batch_size=8)
    tr.step(x, y)
    inj = faults.make_injector(faults.parse(SPEC), 0, "model_step")
    with inj():  # the injector below the recorder: the capture sees the bad chip's bits
        with capture(root):
            tr.step(x, y)
    return root


def test_replay_names_the_corrupted_matmul(faulty_capture: Path) -> None:
    cap = fmt.load(faulty_capture)
    thirteenth_mm = [o.index for o in cap.ops if o.op == "aten.mm.default"][12]
    res = rp.replay(cap, reference="cpu64", inject=SPEC)
    d = res.divergence
    assert d is not None and d.index == thirteenth_mm and d.op == "aten.mm.default"
    assert d.metric.cls == "wrong" and d.metric.bad == 1 and 25 in d.metric.flipped_bits
    assert d.metric.max_ulp > 1e6 and "train.py" in d.stack[0]
    assert res.capture_mismatch is None  # the simulated chip replays the captured bits exactly
    clean = rp.replay(cap, reference="cpu64")
    assert clean.divergence is None and clean.capture_mismatch == thirteenth_mm


def test_shrink_emits_a_single_file_that_reproduces_only_with_the_fault(faulty_capture: Path,
                                                                       tmp_path: Path) -> None:
    r = sk.shrink_capture(str(faulty_capture), reference="cpu64", inject=SPEC)
    assert r.ops <= 3 and r.case.op == "aten.mm.default"
    assert r.seconds < 60
    assert all(i.shape == (1, 1) for i in r.case.inputs)  # halved until one element remained
    path = tmp_path / "repro.py"
    path.write_text(emit.render_op(r.case, device="cpu", metric_line=r.metric.line(), where=r.stack))
    src = path.read_text()
    assert "chipcheck" not in src.split('"""', 2)[2].replace("chipcheck reproducer", "")  # no chipcheck import
    bad = subprocess.run([sys.executable, str(path), "--inject", "bitflip:bit=25", "--repeat", "2"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "REPRODUCED: 2 of 2" in bad.stdout and "25: 1" in bad.stdout
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr


def test_shrink_of_a_clean_capture_is_not_reproducible(faulty_capture: Path) -> None:
    with pytest.raises(sk.NotReproducible, match="nothing to shrink"):
        sk.shrink_capture(str(faulty_capture), reference="cpu64")


def test_ddmin_finds_the_exact_minimum() -> None:
    calls = []

    def fails(xs: list[int]) -> bool:
        calls.append(len(xs))
        return 3 in xs and 7 in xs

    assert sk.ddmin(list(range(16)), fails) == [3, 7]
    assert sk.ddmin([5], lambda xs: 5 in xs) == [5]


def test_find_integer_exponential_then_binary() -> None:
    seen = []

    def f(n: int) -> bool:
        seen.append(n)
        return n <= 37

    assert sk.find_integer(f) == 37
    assert len(seen) < 20 and max(seen) <= 64


def test_shrinker_caches_and_reaches_the_shortlex_minimum() -> None:
    calls = 0

    def fails(xs: tuple[int, ...]) -> bool:
        nonlocal calls
        calls += 1
        return sum(xs) >= 10  # fails while the sum stays >= 10

    def pass_lower(sh: sk.Shrinker[tuple[int, ...]]) -> None:
        for i in range(len(sh.current)):
            cur = sh.current
            n = sk.find_integer(lambda k, i=i, cur=cur: cur[i] - k >= 0 and sh.consider(
                cur[:i] + (cur[i] - k,) + cur[i + 1:]) or k == 0)
            del n

    def pass_drop(sh: sk.Shrinker[tuple[int, ...]]) -> None:
        for i in reversed(range(len(sh.current))):
            sh.consider(sh.current[:i] + sh.current[i + 1:])

    sh = sk.Shrinker(current=(9, 9, 9, 9), fails=fails, key=lambda xs: (len(xs), xs), ident=lambda xs: xs)
    best = sh.run([pass_drop, pass_lower])
    assert best == (1, 9)  # two elements needed; shortlex: the first as small as possible
    before = sh.calls
    assert not sh.consider((9, 9, 9))  # not simpler than the current best: never run
    assert sh.calls == before


def _centred() -> torch.Tensor:
    """Activations centred per column (as a LayerNorm's are): each column's sum cancels to ~1e-6
    while its terms are ~1, so float32 rounding is most of what the sum holds."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    return x - x.double().mean(0).float()


def test_a_sum_that_cancels_is_judged_on_its_terms_rounding(tmp_path: Path) -> None:
    x, w = _centred(), torch.ones(256, 8)
    with capture(tmp_path / "cap"):
        x.sum(0)
        torch.mm(x.t(), w)
    # a healthy chip: the relative tolerance on |expected| + rms(expected) called both sums wrong
    res = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64")
    assert res.divergence is None, res.divergence
    # a bad one is still named: an exponent bit of one column's sum
    spec = "bitflip:rank=0,bit=30,op=sum,index=5,at=call"
    with faults.make_injector(faults.parse(spec), 0, "repro")():
        with capture(tmp_path / "bad"):
            x.sum(0)
            torch.mm(x.t(), w)
    d = rp.replay(fmt.load(tmp_path / "bad"), reference="cpu64", inject=spec).divergence
    assert d is not None and d.op == "aten.sum.dim_IntList" and d.metric.bad == 1 and d.metric.bad_indices == [[5]]


def _conv_under_batchnorm(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> None:
    """A convolution followed by BatchNorm: the gradient BatchNorm hands back is centred per channel, so
    the bias gradient (convolution_backward's third output) cancels to ~1e-8 from terms of ~1."""
    x, w, b = x.clone().requires_grad_(), w.clone().requires_grad_(), torch.zeros(8, requires_grad=True)
    torch.nn.functional.conv2d(x, w, b, padding=1).backward(g)


def test_a_convolution_backward_whose_bias_gradient_cancels_replays_clean(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    x, w, g = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(8, 3, 3, 3, generator=gen), torch.randn(4, 8, 8, 8, generator=gen)
    g = g - g.double().mean((0, 2, 3), keepdim=True).float()
    with capture(tmp_path / "cap"):
        _conv_under_batchnorm(x, w, g)
    # a healthy chip: every channel's bias gradient was called wrong (max_rel ~10)
    res = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64")
    assert res.divergence is None, res.divergence
    spec = "bitflip:rank=0,bit=30,op=convolution_backward,output=2,index=3,at=call"
    with faults.make_injector(faults.parse(spec), 0, "repro")():
        with capture(tmp_path / "bad"):
            _conv_under_batchnorm(x, w, g)
    d = rp.replay(fmt.load(tmp_path / "bad"), reference="cpu64", inject=spec).divergence
    assert d is not None and d.op == "aten.convolution_backward.default" and d.output == 2, d
    assert d.metric.bad == 1 and d.metric.bad_indices == [[3]], d
    # repro.py of the op as recorded judges it the same way: 0 on the healthy host, 1 with the fault
    case = sk.op_case(fmt.load(tmp_path / "bad").ops[d.index], d.inputs, d.output)
    path = tmp_path / "repro.py"
    path.write_text(emit.render_op(case, device="cpu", metric_line=d.metric.line()))
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    hook = verify.hook_spec(spec, 0, op=d.op, history=False, live=True)
    assert hook == "bitflip:bit=30,index=3,output=2"
    bad = subprocess.run([sys.executable, str(path), "--inject", hook], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr


@pytest.mark.parametrize("op", ["embedding_dense_backward", "_adaptive_avg_pool2d", "avg_pool2d", "index_add",
                                "scatter_add"])
def test_other_sums_whose_terms_cancel_replay_clean(op: str, tmp_path: Path) -> None:
    """Each sums terms that cancel here (centred activations; the gradient rows of one repeated token):
    the plain tolerance on |expected| + rms(expected) called a healthy chip wrong."""
    x, idx = _centred(), torch.zeros(256, dtype=torch.int64)
    windows = x.t().reshape(64, 1, 16, 16).repeat(1, 1, 1, 2)  # each window: one column's 256 terms
    runs: dict[str, Callable[[], object]] = {
        "embedding_dense_backward": lambda: torch.ops.aten.embedding_dense_backward(x, idx, 2, -1, False),
        "_adaptive_avg_pool2d": lambda: torch.nn.functional.adaptive_avg_pool2d(windows, (1, 2)),
        "avg_pool2d": lambda: torch.nn.functional.avg_pool2d(windows, 16),
        "index_add": lambda: torch.zeros(2, 64).index_add(0, idx, x),
        "scatter_add": lambda: torch.zeros(2, 64).scatter_add(0, idx[:, None].expand(256, 64), x),
    }
    with capture(tmp_path / "cap"):
        runs[op]()
    loaded = fmt.load(tmp_path / "cap")
    assert any(o.op.split(".")[1] == op for o in loaded.ops), [o.op for o in loaded.ops]
    assert rp.replay(loaded, reference="cpu64").divergence is None


def test_repro_py_judges_a_cancelling_sum_as_replay_does(tmp_path: Path) -> None:
    x = _centred()
    case = sk.OpCase(op="aten.sum.dim_IntList", args=[{"in": 0}, [0]], kwargs={},
                     inputs=(sk.Input(kind="data", shape=tuple(x.shape), dtype="float32", data=x),))
    path = tmp_path / "repro.py"
    path.write_text(emit.render_op(case, device="cpu", metric_line="(test)"))
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert good.returncode == 0 and "or the op on |inputs|" in good.stdout, good.stdout + good.stderr
    assert "def cancelling_terms" not in path.read_text()  # embedded only where the checked op needs it
    for f in (tol.outside_tolerance, tol.widened_scale):  # replay's rule itself, not a copy of it
        assert inspect.getsource(f) in path.read_text()
    bad = subprocess.run([sys.executable, str(path), "--inject", "bitflip:bit=30"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr


def _experts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MoE layer's expert GEMMs as transformers runs them: one grouped GEMM over tokens sorted by
    expert (`aten._grouped_mm`, which has no float64 kernel)."""
    g = torch.Generator().manual_seed(3)
    tokens, experts = torch.randn(32, 16, generator=g), torch.randn(4, 16, 8, generator=g)
    return tokens, experts, torch.tensor([5, 13, 24, 32], dtype=torch.int32)


def test_an_op_with_no_float64_kernel_is_judged_in_its_own_dtype_on_the_reference(tmp_path: Path) -> None:
    tokens, experts, offs = _experts()
    spec = "bitflip:rank=0,bit=25,op=_grouped_mm,index=40,at=call"
    for name, inject in (("clean", None), ("bad", spec)):
        with faults.make_injector(faults.parse(spec), 0, "repro")() if inject else contextlib.nullcontext():
            with capture(tmp_path / name):
                torch.relu(torch.ops.aten._grouped_mm(tokens, experts, offs)).sum()
    clean = rp.replay(fmt.load(tmp_path / "clean"), reference="cpu64")
    assert clean.divergence is None and clean.not_compared == [] and len(clean.native) == 1, clean
    d = rp.replay(fmt.load(tmp_path / "bad"), reference="cpu64", inject=spec).divergence
    assert d is not None and d.op == "aten._grouped_mm.default" and d.metric.bad_indices == [[5, 0]], d
    # the shrunk file judges it the same way: exit 1 with the fault, 0 without
    r = sk.shrink_capture(str(tmp_path / "bad"), reference="cpu64", inject=spec)
    assert r.case.op == "aten._grouped_mm.default"
    # its offsets kept as recorded, and the rows they point into kept: shrunk to 8 rows under offsets up
    # to 13, the grouped GEMM read and wrote past its tensors and repro.py failed on a healthy host
    tok, _, offsets = r.case.inputs
    assert offsets.kind == "data" and offsets.data.tolist() == [5, 13, 24, 32] and tok.shape[0] >= 32, r.case
    path = tmp_path / "repro.py"
    path.write_text(emit.render_op(r.case, device="cpu", metric_line=r.metric.line()))
    bad = subprocess.run([sys.executable, str(path), "--inject", "bitflip:bit=25"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 1 and "its own dtype on the host" in bad.stdout, bad.stdout + bad.stderr
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr


def _blind_losses() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """A loss blind to what each op removes (a sum straight after a norm, a softmax summed to one, a
    distillation term under log-softmax, attention over identical values): the true input gradient is
    zero, so a correct kernel's backward hands back only the rounding of terms that cancel."""
    f = torch.nn.functional

    def eval_bn(x: torch.Tensor) -> torch.Tensor:
        w = torch.ones(64, requires_grad=True)  # its gradient: the batch's x-hat summed, centred by the running stats
        return f.batch_norm(x, x.detach().mean(0), x.detach().var(0, unbiased=False), w, None, training=False).sum()

    return {"native_layer_norm_backward": lambda x: f.layer_norm(x, (64,)).sum(),
            "native_group_norm_backward": lambda x: f.group_norm(x.reshape(16, 8, 8), 4).sum(),
            "native_batch_norm_backward": lambda x: f.batch_norm(x, None, None, training=True).sum(),
            "native_batch_norm_backward/eval": eval_bn,
            "_softmax_backward_data": lambda x: torch.softmax(x, -1).sum(),
            "_log_softmax_backward_data": lambda x: (torch.log_softmax(x, -1) * torch.softmax(x, -1).detach()).sum(),
            # identical value rows (one token repeated, no position in V): which key is attended is moot
            "_scaled_dot_product_flash_attention_for_cpu_backward": lambda x: f.scaled_dot_product_attention(
                x.reshape(2, 2, 8, 32), x.reshape(2, 2, 8, 32).flip(-1) + 5, x[:1, :32].expand(2, 2, 8, 32)).sum(),
            "_scaled_dot_product_flash_attention_for_cpu_backward/causal-gqa": lambda x: f.scaled_dot_product_attention(
                x.reshape(1, 4, 8, 32), x[:4].reshape(1, 2, 8, 16).repeat(1, 1, 1, 2) + 5,
                x[:1, :32].expand(1, 2, 8, 32), is_causal=True, enable_gqa=True).sum()}


def _blind_step(op: str) -> None:
    x = (torch.randn(16, 64, generator=torch.Generator().manual_seed(6)) * 3 + 1).requires_grad_()
    _blind_losses()[op](x).backward()


@pytest.mark.parametrize("op", list(_blind_losses()))
def test_a_backward_whose_terms_cancel_replays_clean_and_a_fault_in_it_is_named(
        op: str, tmp_path: Path) -> None:
    with capture(tmp_path / "cap"):
        _blind_step(op)
    loaded = fmt.load(tmp_path / "cap")
    name = op.split("/")[0]
    assert any(o.op.split(".")[1] == name for o in loaded.ops), [o.op for o in loaded.ops]
    # a healthy chip: the plain tolerance on |expected| + rms(expected) called ~every element wrong
    assert rp.replay(loaded, reference="cpu64").divergence is None
    output = 1 if op.endswith("/eval") else 0
    index = 5 if "attention" not in op else 300  # a query that attends to more than one key (causal)
    spec = f"bitflip:rank=0,bit=30,op={name},output={output},index={index},at=call"
    with faults.make_injector(faults.parse(spec), 0, "repro")():
        with capture(tmp_path / "bad"):
            _blind_step(op)
    d = rp.replay(fmt.load(tmp_path / "bad"), reference="cpu64", inject=spec).divergence
    assert d is not None and d.op.split(".")[1] == name and d.output == output and d.metric.bad == 1, d
    if op != "native_layer_norm_backward":
        return
    # repro.py of the op judges it as replay does: 0 on the healthy host, 1 with the fault
    case = sk.op_case(fmt.load(tmp_path / "bad").ops[d.index], d.inputs, d.output)
    path = tmp_path / "repro.py"
    path.write_text(emit.render_op(case, device="cpu", metric_line=d.metric.line()))
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert good.returncode == 0 and "or its terms" in good.stdout, good.stdout + good.stderr
    assert "def cancelling_terms" in path.read_text() and "def terms_of" in path.read_text()
    bad = subprocess.run([sys.executable, str(path), "--inject", "bitflip:bit=30,index=5"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr


def test_the_terms_bound_stands_aside_where_it_cannot_rebuild_the_terms() -> None:
    """Replay and repro.py share this contract: None means the plain tolerance, never an exception."""
    g, x = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    mean, rstd = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True).add(1e-5).rsqrt()
    args = [g, x, [8], mean, rstd, torch.ones(8, dtype=torch.float64), None, [True, True, True]]
    bound = cancelling_terms("native_layer_norm_backward", args, {}, 0)
    assert bound is not None and bound.shape == x.shape and bool((bound > 0).all())
    assert cancelling_terms("native_layer_norm_backward", args, {}, 3) is None  # an output past the list
    assert cancelling_terms("native_layer_norm_backward", args[:2], {}, 0) is None  # a layout it does not know
    assert cancelling_terms("mm", [g, x.T], {}, 0) is None  # not a cancelling op
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    flash = [q, q, q, q, q, torch.zeros(1, 2, 4), 0.1, False]  # dropout: the weights are not in the args
    assert cancelling_terms("_scaled_dot_product_flash_attention_for_cpu_backward", flash, {}, 0) is None


def test_a_flipped_mantissa_bit_in_a_gradient_that_does_not_cancel_is_still_named(tmp_path: Path) -> None:
    """The terms' bound widens the tolerance only where the terms cancel: a layer norm (or attention)
    feeding a linear layer hands back a gradient of its terms' size, and bit 20 (about 12% of the
    value) shows."""
    with torch.random.fork_rng():  # seeded: under a weight drawn by chance, element 5 can sit far below its
        torch.manual_seed(0)       # terms (3 of 30 seeds), where a bound of the terms' size cannot see 12%
        lin = torch.nn.Linear(64, 8)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(7)).requires_grad_()
    spec = "bitflip:rank=0,bit=20,op=native_layer_norm_backward,index=5,at=call"
    with faults.make_injector(faults.parse(spec), 0, "repro")():
        with capture(tmp_path / "bad"):
            lin(torch.nn.functional.layer_norm(x, (64,))).pow(2).sum().backward()
    d = rp.replay(fmt.load(tmp_path / "bad"), reference="cpu64", inject=spec).divergence
    assert d is not None and d.op == "aten.native_layer_norm_backward.default" and d.metric.bad_indices == [[0, 5]], d
    # and in attention's query gradient (random values: the terms do not cancel)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(s)).requires_grad_() for s in (1, 2, 3))
    spec = "bitflip:rank=0,bit=20,op=_scaled_dot_product_flash_attention_for_cpu_backward,index=5,at=call"
    with faults.make_injector(faults.parse(spec), 0, "repro")():
        with capture(tmp_path / "attn"):
            lin(torch.nn.functional.scaled_dot_product_attention(q, k, v).reshape(8, 32).repeat(1, 2)).pow(2).sum().backward()
    d = rp.replay(fmt.load(tmp_path / "attn"), reference="cpu64", inject=spec).divergence
    assert d is not None and d.op.split(".")[1] == "_scaled_dot_product_flash_attention_for_cpu_backward", d
    assert d.output == 0 and d.metric.bad_indices == [[0, 0, 0, 5]], d


def test_the_correctly_rounded_value_always_agrees_and_a_flip_of_it_does_not() -> None:
    # values below float16's smallest normal: a cast rounds them to its few steps (or to zero), which is
    # no error; against the unrounded float64 value, with the tensor's own tiny scale, it read as one
    e = torch.randn(256, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-8
    a = e.to(torch.float16)
    assert not tol.outside_tolerance(a, e, rp.RTOL[torch.float16]).any()
    flipped = a.clone()
    flipped.view(torch.int16)[7] ^= 1 << 14  # an exponent bit
    assert tol.outside_tolerance(flipped, e, rp.RTOL[torch.float16]).nonzero().flatten().tolist() == [7]


def test_a_cast_into_float16_underflow_replays_clean(tmp_path: Path) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-8
    with capture(tmp_path / "cap"):
        (x.float().half().float() * 3).sum()
    res = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64")
    assert res.divergence is None, res.divergence
