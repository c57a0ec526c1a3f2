"""A shrunk op keeps the memory layout its inputs had in the step. Kernels choose their path by
layout (a GEMM's transposed operand, attention's (b, h, s, d) view of (b, s, h, d) memory), and a
bad chip's fault lands at an address, not at a logical index: a case rebuilt row-major ran another
kernel and put the fault on another element. On a HuggingFace Llama step under bf16 autocast, the
op that diverged in the step (SDPA) then passed alone, and shrink gave up."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from chipcheck.probes import faults
from chipcheck.reproducers import capture
from chipcheck.reproducers import format as fmt
from chipcheck.reproducers import shrink as sk

SDPA = "_scaled_dot_product_flash_attention_for_cpu"


def test_a_case_input_is_rebuilt_with_the_layout_it_was_given() -> None:
    x = torch.arange(2 * 8 * 4 * 16, dtype=torch.float32).reshape(2, 8, 4, 16)
    q = x.transpose(1, 2)  # (b, h, s, d) over (b, s, h, d) memory, as attention layers build it
    rec = fmt.OpRecord(index=0, op="aten.mm.default", args=[{"t": 0}, {"t": 1}, {"t": 2}, {"t": 3}], kwargs={},
                       outputs=[], out_meta=[], fingerprints=[])
    cl = x.contiguous(memory_format=torch.channels_last)  # dims in memory (0, 2, 3, 1): not its own inverse
    case = sk.op_case(rec, [q, x, x[:, ::2], cl], 0)
    made = [i.make("cpu") for i in case.inputs]
    assert made[0].stride() == q.stride() and torch.equal(made[0], q)
    assert case.inputs[3].order == (0, 2, 3, 1) and made[3].stride() == cl.stride() and torch.equal(made[3], x)
    assert case.inputs[1].order is None and made[1].is_contiguous()  # row-major stays row-major
    assert case.inputs[2].order is None and torch.equal(made[2], x[:, ::2])  # a strided slice: values only


def _attention(root: Path, fault: str | None) -> None:
    # V is 1 in head 1's column 0 and 0 elsewhere: out[0, 1, :, 0] is 1, every other element 0. The
    # fault flips bit 12 of element 2 in memory order, which is out[0, 1, 0, 0] in the step's
    # (b, s, h, d) memory (1 -> 2**-32: wrong) but out[0, 0, 1, 0] row-major (0 -> 2**-95: within
    # tolerance). So the op fails alone only when rebuilt as it was laid out.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 2, 4, 2, generator=g).to(torch.bfloat16)
    v = torch.zeros(1, 2, 4, 2, dtype=torch.bfloat16)
    v[0, 1, :, 0] = 1
    off = faults.start_process_faults(faults.parse(fault), 0) if fault else None
    with capture(root):
        q = x.view(1, 4, 2, 2).transpose(1, 2)
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if off:
        off()


def test_an_attention_fault_on_a_transposed_query_shrinks_to_a_verified_repro(tmp_path: Path) -> None:
    fault = f"bitflip:rank=0,bit=12,dtype=bfloat16,op={SDPA},index=2,scope=process"
    _attention(tmp_path / "clean", None)
    p = run_cli("repro", "replay", str(tmp_path / "clean"), "--reference", "cpu64")
    assert p.returncode == 0 and "every op agrees with cpu64" in p.stdout, p.stdout + p.stderr
    _attention(tmp_path / "cap", fault)
    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(tmp_path / "cap"), "--reference", "cpu64", "--inject", fault, "-o", str(out))
    assert p.returncode == 0 and "verified:" in p.stdout, p.stdout + p.stderr
    assert SDPA in p.stdout
    bad = subprocess.run([sys.executable, str(out), "--inject", "bitflip:bit=12,index=2"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "REPRODUCED" in bad.stdout, bad.stdout + bad.stderr
    good = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr


@pytest.mark.parametrize("order", [None, (0, 2, 1, 3)])
def test_repro_py_corrupts_a_permuted_output_in_memory_order(order: tuple[int, ...] | None, tmp_path: Path) -> None:
    # the file's own fault hook walked `t.view(-1)`, which a permuted output (attention's) refuses
    from chipcheck.reproducers import emit

    v = torch.zeros(1, 2, 4, 2, dtype=torch.float32)
    v[0, 1, :, 0] = 1
    ins = (sk.Input(kind="data", shape=(1, 2, 4, 2), dtype="float32", data=torch.ones(1, 2, 4, 2), order=order),
           sk.Input(kind="data", shape=(1, 2, 4, 2), dtype="float32", data=torch.ones(1, 2, 4, 2)),
           sk.Input(kind="data", shape=(1, 2, 4, 2), dtype="float32", data=v))
    case = sk.OpCase(op=f"aten.{SDPA}.default", args=[{"in": 0}, {"in": 1}, {"in": 2}], kwargs={}, inputs=ins)
    out = tmp_path / "repro.py"
    out.write_text(emit.render_op(case, device="cpu", metric_line="(test)"))
    assert ("dims in memory (0, 2, 1, 3)" in out.read_text()) == (order is not None)
    good = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    # element 2 in memory order: out[0, 1, 0, 0] (= 1) laid out (b, s, h, d); out[0, 0, 1, 0] (= 0) row-major
    bad = subprocess.run([sys.executable, str(out), "--inject", "bitflip:bit=20,index=2"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == (1 if order else 0), bad.stdout + bad.stderr


def test_repro_py_rebuilds_a_channels_last_input(tmp_path: Path) -> None:
    from chipcheck.reproducers import emit

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 3, 4, 4, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    ins = (sk.Input(kind="data", shape=(1, 3, 4, 4), dtype="float32", data=x, order=(0, 2, 3, 1)),
           sk.Input(kind="data", shape=(2, 3, 3, 3), dtype="float32", data=w))
    case = sk.OpCase(op="aten.convolution.default", args=[{"in": 0}, {"in": 1}, None, [1, 1], [1, 1], [1, 1], False,
                                                          [0, 0], 1], kwargs={}, inputs=ins)
    assert sk.Target(device="cpu", reference="cpu64").run(case).metric is None
    out = tmp_path / "repro.py"
    out.write_text(emit.render_op(case, device="cpu", metric_line="(test)"))
    good = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and "agrees" in good.stdout, good.stdout + good.stderr
    assert inspect.getsource(fmt.laid_out) in out.read_text()  # the shrinker's own rule, not a copy of it
