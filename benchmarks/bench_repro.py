"""Reproducer benchmarks: capture overhead on the model step, shrink time, emitted file size.

    python benchmarks/bench_repro.py [--steps 5] [--json benchmarks/results/repro.json]

Capture overhead is the ratio of a captured step's wall time to a bare step's (medians over
`--steps`, same trainer, interleaved bare / flight recorder / flight recorder with the live C++ op
log, then bare / full capture / a dispatch mode that records nothing, the floor under any Python op
recorder), on the tiny GPT (468 ops of a few
microseconds: the worst case), the `bench` preset (3 M parameters, the same ops on GEMMs that take
time) and a HuggingFace GPT-2; the flight
recorder's is a step inside `FlightRecorder.step` (a snapshot of the step's starting state) over a
bare one, and its snapshot is also timed on its own right after a step (whole, fused copy, RNG
states, settings), as a share of the bare step: on this noisy host the ratio of two medians swings by
several percent from run to run. Shrink time is `shrink_capture` end to end (differential
replay, single-op isolation, input shrinking) on a step with one injected bit flip in a backward mm.
Intermittent: the same capture shrunk under a fault that hits an mm with 25% probability
(reproducers/trials.py): how often the shrunk op failed in 24 trials, the trial plan the repro.py
runs by default, and the shrink's time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.probes import faults
from chipcheck.reproducers import FlightRecorder, capture, emit, oplog
from chipcheck.reproducers import shrink as sk

SPEC = "bitflip:rank=0,bit=25,op=mm,after=12,count=1,at=call"
SPEC_25 = "bitflip:rank=0,bit=25,op=mm,chance=0.25,seed=1,at=call"


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that only calls the op: the floor under any Python-level op recorder."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _timed(step: Callable[[], object], around: Callable[[int], Any]) -> float:
    t0 = time.perf_counter()
    with around(0):
        step()
    return time.perf_counter() - t0


EVERY = 8
"""The checkpoint interval of the flight recorder measured with one (`FlightRecorder(every=EVERY)`)."""


def _recorders(model: Any, opt: Any) -> tuple[FlightRecorder, FlightRecorder, FlightRecorder | None]:
    """A flight recorder, one that copies the state every EVERY-th step only (the steps in between kept
    by their inputs), and one that keeps the live op log too (None where it cannot be built)."""
    logged = FlightRecorder(model, opt, oplog=True) if oplog.available() is None else None
    return FlightRecorder(model, opt), FlightRecorder(model, opt, every=EVERY), logged


def overheads(step: Callable[[], object], recs: tuple[FlightRecorder, FlightRecorder, FlightRecorder | None],
              batch: object, steps: int, tmp: str) -> dict[str, Any]:
    """Medians of a bare step, one under the flight recorder, one under the flight recorder with a
    checkpoint every EVERY steps (per whole interval of EVERY steps: needs `steps` >= EVERY) and one
    under the flight recorder with the live op log (a C++ RecordFunction callback: every top-level op
    with its tensors' dtypes and shapes; the values come from re-execution), interleaved; then, in a
    loop of their own (a captured step leaves the allocator and caches in another state than a bare
    one, and the recorder's few percent must not carry that), a bare step, one under full capture and
    one under a dispatch mode that records nothing (the floor of any Python op recorder), interleaved."""
    rec, sparse, logged = recs
    bare, flown, flown_sparse, flown_log = [], [], [], []
    step()
    for _ in range(steps):
        bare.append(_timed(step, lambda _i: contextlib.nullcontext()))
        flown.append(_timed(step, lambda _i: rec.step(batch)))
        flown_sparse.append(_timed(step, lambda _i: sparse.step(batch)))
        if logged is not None:
            flown_log.append(_timed(step, lambda _i: logged.step(batch)))
    bare2, captured, floor = [], [], []
    for i in range(steps):
        bare2.append(_timed(step, lambda _i: contextlib.nullcontext()))
        captured.append(_timed(step, lambda _i, i=i: capture(Path(tmp) / f"o{i}")))
        floor.append(_timed(step, lambda _i: _Passthrough()))
        shutil.rmtree(Path(tmp) / f"o{i}")
    b, f, b2, c, p = (statistics.median(x) for x in (bare, flown, bare2, captured, floor))
    # each whole interval (one checkpoint, EVERY-1 steps kept by their inputs) over the bare steps
    # interleaved with it: the checkpoint's copy counted once per interval, as it is paid
    per_interval = [sum(flown_sparse[i:i + EVERY]) / sum(bare[i:i + EVERY])
                    for i in range(0, len(bare) - EVERY + 1, EVERY)]
    parts = snapshot_parts(step, rec, batch, steps)
    with_log: dict[str, Any] = {"flight_recorder_oplog": oplog.available()}  # why not, where it cannot run
    if logged is not None:
        fl = statistics.median(flown_log)
        with_log = {"step_flight_recorder_oplog_ms": 1e3 * fl, "flight_recorder_oplog_overhead_ratio": fl / b,
                    "oplog_ops_per_step": len(logged.last.oplog or ())}
    return {"step_bare_ms": 1e3 * b, "step_flight_recorder_ms": 1e3 * f, **with_log,
            "flight_recorder_every": EVERY,
            "flight_recorder_every_overhead_ratio": statistics.median(per_interval) if per_interval else None,
            "flight_recorder_every_intervals": len(per_interval),
            "step_bare_capture_loop_ms": 1e3 * b2,
            "step_captured_ms": 1e3 * c, "flight_recorder_overhead_ratio": f / b, "capture_overhead_ratio": c / b2,
            "dispatch_floor_ratio": p / b2, "snapshot_bytes": rec.last.nbytes(), "snapshot_parts": parts,
            # the snapshot timed on its own against the bare step: steadier than the ratio of two medians,
            # whose steps also pay for each other's cache misses in the interleaved loop
            "snapshot_share_of_bare_step": parts["snapshot_us"] / (1e6 * b),
            # every=EVERY the same way: a checkpoint and EVERY-1 steps kept by their inputs per EVERY steps
            "every_share_of_bare_step": (parts["snapshot_us"] + (EVERY - 1) * parts["between_us"]) / EVERY / (1e6 * b)}


def snapshot_parts(step: Callable[[], object], rec: FlightRecorder, batch: object, steps: int) -> dict[str, float]:
    """Where a snapshot's time goes, each part timed right after a step (as in use: the step has
    just pushed the state out of the caches): the whole snapshot, its fused copy of the state into the
    slot's memory, the RNG states (torch, Python, numpy) and the settings; and a step kept by its
    inputs alone (`every=K` between checkpoints: entering and leaving `step`); microseconds, medians."""
    from chipcheck.reproducers import flight
    from chipcheck.reproducers import settings as st

    parts: dict[str, list[float]] = {"snapshot_us": [], "copy_us": [], "rng_us": [], "settings_us": [],
                                     "between_us": []}
    slot = rec.snapshot(batch)
    live = [t.clone() for t in slot.tensors]  # a second copy of the state, as the live tensors are sized
    sparse = FlightRecorder(rec.model, rec.optimizer, every=1 << 30)  # its first step the only checkpoint

    def between() -> None:
        with sparse.step(batch):
            pass

    between()
    timed: dict[str, Callable[[], object]] = {
        "snapshot_us": lambda: rec.snapshot(batch), "copy_us": lambda: flight._copy_all(slot.tensors, live),
        "rng_us": flight.RngState.now, "settings_us": st.current, "between_us": between}
    for _ in range(steps):
        for name, part in timed.items():
            step()
            t0 = time.perf_counter()
            part()
            parts[name].append(time.perf_counter() - t0)
    return {k: 1e6 * statistics.median(v) for k, v in parts.items()}


def trainer_overheads(preset: str, steps: int, tmp: str) -> dict[str, Any]:
    mc = GPTConfig.preset(preset)
    tr = Trainer(mc, TrainConfig(), seed=1)
    x, y = data.batch(mc, 1, 0, batch_size=8)
    return {"preset": preset, "params": sum(p.numel() for p in tr.model.parameters()),
            **overheads(lambda: tr.step(x, y), _recorders(tr.model, tr.opt), (x, y), steps, tmp)}


def hf_overheads(steps: int) -> dict[str, object]:
    """The same on a HuggingFace transformers GPT-2 (tiny config, no download), one process."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return {"skipped": "transformers is not installed (pip install -e .[test])"}
    import torch

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, attn_pdrop=0.0,
                     embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    with tempfile.TemporaryDirectory() as tmp:
        return {"model": "transformers GPT2LMHeadModel n_layer=2 n_embd=64, batch 4x32",
                **overheads(step, _recorders(model, opt), ids, steps, tmp)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    mc = GPTConfig.tiny()
    tr = Trainer(mc, TrainConfig(), seed=1)
    x, y = data.batch(mc, 1, 0, batch_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = trainer_overheads("tiny", a.steps, tmp)
        bench = trainer_overheads("bench", a.steps, tmp)
        root = Path(tmp) / "faulty"
        inj = faults.make_injector(faults.parse(SPEC), 0, "model_step")
        with inj():
            with capture(root) as c:
                tr.step(x, y)
        ops = len(c.result.ops) if c.result else 0
        cap_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        r = sk.shrink_capture(str(root), inject=SPEC)
        shrink_s = time.perf_counter() - t0
        text = emit.render_op(r.case, device="cpu", metric_line=r.metric.line(), where=r.stack)
        # the same op with its recorded (unshrunk) inputs embedded: the file size without input shrinking
        full = sk.op_case(next(o for o in c.result.ops if o.index == r.divergence.index), r.divergence.inputs, 0)
        text_full = emit.render_op(full, device="cpu", metric_line=r.metric.line())
        t0 = time.perf_counter()
        r25 = sk.shrink_capture(str(root), inject=SPEC_25, passes=5)
        shrink25_s = time.perf_counter() - t0
    import os
    import platform

    import torch

    out = {"date": time.strftime("%Y-%m-%d"), "preset": "tiny",
           "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
           **tiny,
           "ops_per_step": ops, "capture_dir_bytes": cap_bytes, "shrink_s": shrink_s, "shrink_candidates": r.tries,
           "repro_bytes": len(text), "repro_bytes_unshrunk_inputs": len(text_full),
           "hf": hf_overheads(a.steps), "bench_preset": bench,
           "intermittent_25pct": {"failed": r25.rate.failed if r25.rate else None,
                                  "of": r25.rate.trials if r25.rate else None,
                                  "planned_trials": r25.rate.plan if r25.rate else None,
                                  "shrink_s": shrink25_s, "op": r25.case.op}}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
