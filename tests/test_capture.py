"""reproducers.capture: the op log of a real training step, its inputs, and bit-exact replay."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.reproducers import capture
from chipcheck.reproducers import format as fmt
from chipcheck.reproducers import replay as rp

MC = GPTConfig.tiny()


def test_capture_records_every_op_and_saves_only_unproduced_tensors(tmp_path: Path) -> None:
    tr = Trainer(MC, TrainConfig(), seed=3)
    x, y = data.batch(MC, 3, 0, batch_size=4)
    tr.step(x, y)  # AdamW state exists: the captured step is a steady-state step
    with capture(tmp_path / "cap") as c:
        tr.step(x, y)
    cap = fmt.load(tmp_path / "cap")
    assert c.result is not None and len(cap.ops) == len(c.result.ops) > 300
    names = {o.op for o in cap.ops}
    assert {"aten.mm.default", "aten.addcdiv_.default", "aten.nll_loss_backward.default"} <= names
    mm = next(o for o in cap.ops if o.op == "aten.mm.default")
    assert mm.out_meta[0] is not None and mm.out_meta[0].dtype == "float32" and len(mm.fingerprints[0]) == 16
    assert mm.stack and "gpt.py" in mm.stack[0]  # the user frame that called the kernel
    # saved: parameters, the batch and AdamW moments; never an op's output
    seen: set[int] = set()
    produced: set[int] = set()
    for o in cap.ops:
        seen |= set(_vids(o.args))
        produced |= {v for v in o.outputs if v is not None and v not in seen}  # new tensors, not in-place
        seen |= produced
    assert produced and not produced & set(cap.tensors)
    n_state = sum(1 for _ in tr.state_tensors())
    assert len(cap.tensors) >= n_state - len(tr.params)  # moments (+ params, batch)
    blobs = list((tmp_path / "cap" / "blobs").iterdir())
    assert all(len(b.stem) == 64 for b in blobs)
    ref = next(iter(cap.tensors.values()))
    assert fmt.sha256(fmt.get_blob(cap.root, ref.sha256)) == ref.sha256
    assert cap.settings["num_threads"] >= 1 and cap.env["torch"] == torch.__version__


def _vids(x: object) -> list[int]:
    if isinstance(x, list):
        return [v for y in x for v in _vids(y)]
    return [x["t"]] if isinstance(x, dict) and "t" in x else []


def test_replay_on_the_capture_device_is_bit_exact_and_clean_vs_cpu64(tmp_path: Path) -> None:
    tr = Trainer(MC, TrainConfig(), seed=4)
    x, y = data.batch(MC, 4, 0, batch_size=2)
    with capture(tmp_path / "cap"):
        tr.step(x, y)
    res = rp.replay(fmt.load(tmp_path / "cap"), reference="cpu64", stop_at_first=False)
    assert res.divergence is None, res.divergence
    assert res.capture_mismatch is None


def test_bad_capture_dir_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(fmt.CaptureError, match="not a capture directory"):
        fmt.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fmt.CaptureError, match="no rank"):
        fmt.load(tmp_path / "empty")


def test_memory_written_outside_the_dispatcher_is_saved_as_read(tmp_path: Path) -> None:
    """DDP fills a freshly allocated tensor through a raw pointer (its bucket indices) and then copies
    it: replay's own allocation holds other bytes, so the recorder saves what the live op read.
    Memory an op writes first (`out=`, in place) costs nothing: it is recomputed."""
    src = torch.arange(8, dtype=torch.float32)
    with capture(tmp_path / "cap") as c:
        hidden = torch.empty(8)
        ctypes.memmove(hidden.data_ptr(), src.data_ptr(), 8 * 4)  # no ATen op: invisible to the recorder
        seen = hidden.mul_(2)  # in place: it reads what it overwrites
        out = torch.empty(8)
        torch.mul(src, 3, out=out)  # written by an op before anything reads it
        total = (seen + out).sum()
    assert float(total) == float((src * 5).sum())
    assert c.result is not None
    saved = sorted(tuple(r.meta.shape) for r in c.result.tensors.values())
    assert saved == [(8,), (8,)], saved  # `src`, and `hidden` as the multiply read it; not `out`
    res = rp.replay(fmt.load(tmp_path / "cap"), device="cpu", reference="cpu64")
    assert res.divergence is None and res.capture_mismatch is None, res
