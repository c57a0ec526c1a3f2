"""The flight recorder: a snapshot per step, and a recaptured step that computes what the step computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.probes import faults
from chipcheck.reproducers import flight
from chipcheck.reproducers import format as fmt
from chipcheck.reproducers import replay as rp
from chipcheck.reproducers import shrink as sk


def _trainer() -> tuple[Trainer, list[tuple[torch.Tensor, torch.Tensor]]]:
    mc = GPTConfig.tiny()
    tr = Trainer(mc, TrainConfig(), seed=1)
    return tr, [data.batch(mc, 1, s, batch_size=4) for s in range(3)]


def _state(tr: Trainer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tr.state_tensors()]


def _noisy_step(tr: Trainer, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # a step that draws from the RNGs (as dropout would): re-execution must draw the same
    x, y = b
    loss = tr.step(x, y)
    return loss + torch.rand(()) * 0


def test_a_recaptured_step_computes_the_same_bits_as_the_step_did(tmp_path: Path) -> None:
    tr, batches = _trainer()
    rec = flight.FlightRecorder(tr.model, tr.opt, keep=2)
    losses, after = [], []
    for b in batches:
        with rec.step(b):
            losses.append(_noisy_step(tr, b))
        after.append(_state(tr))
    assert [s.step for s in rec.snapshots] == [1, 2] and rec.last.nbytes() > 0
    torch.rand(5)  # the RNG moved on since
    where = rec.recapture(lambda b: _noisy_step(tr, b), tmp_path / "cap")
    assert where == tmp_path / "cap" / "trial-0"
    assert all(torch.equal(a, b) for a, b in zip(after[-1], _state(tr), strict=True))
    cap = fmt.load(where)
    assert any(o.op == "aten.mm.default" for o in cap.ops)
    # the step before it, from the older snapshot, too
    rec.recapture(lambda b: _noisy_step(tr, b), tmp_path / "cap1", snap=rec.snapshots[0])
    assert all(torch.equal(a, b) for a, b in zip(after[-2], _state(tr), strict=True))


SPEC = "bitflip:rank=0,bit=25,op=mm,chance=0.5,seed=2,at=call"


def test_an_intermittent_fault_is_recaptured_on_the_trial_that_shows_it_and_shrinks(tmp_path: Path) -> None:
    tr, batches = _trainer()
    rec = flight.FlightRecorder(tr.model, tr.opt)
    (f,) = faults.parse(SPEC)
    inj = faults.make_injector([f], 0, "step")
    clean = None
    for b in batches:
        with rec.step(b):
            clean = tr.step(*b)  # the step ran clean; the chip is marginal
    assert clean is not None and torch.isfinite(clean)

    rec.restore()
    expected = tr.step(*rec.last.batch)
    with inj():  # the chip is marginal from now on, for every kernel (entered outside the capture)
        where = rec.recapture(lambda b: tr.step(*b), tmp_path / "cap", trials=8,
                              failed=lambda loss: not torch.equal(loss, expected))
    assert where is not None
    res = rp.replay(fmt.load(where), inject=SPEC)
    assert res.divergence is not None and res.divergence.op == "aten.mm.default"
    r = sk.shrink_capture(str(where), inject=SPEC)
    assert r.case.op == "aten.mm.default" and r.rate is not None and r.rate.failed > 0


@pytest.mark.parametrize("every", [1, 3])  # 3: the saved step is its checkpoint's state and 2 steps' inputs
def test_a_snapshot_saved_to_disk_recaptures_in_a_fresh_model(tmp_path: Path, every: int) -> None:
    tr, batches = _trainer()
    rec = flight.FlightRecorder(tr.model, tr.opt, every=every)
    for b in batches:
        with rec.step(b):
            tr.step(*b)
    after = _state(tr)
    assert len(rec.last.replay) == (0 if every == 1 else 2)
    path = rec.save(tmp_path / "snap.pt")
    fresh, _ = _trainer()  # another process would build its model and optimizer again
    fresh.step(*batches[0])  # (its optimizer must hold state of the same shape to load)
    other = flight.FlightRecorder(fresh.model, fresh.opt)
    other.load(path)
    other.recapture(lambda b: fresh.step(*b), tmp_path / "cap")
    assert all(torch.equal(a, b) for a, b in zip(after, _state(fresh), strict=True))
    with pytest.raises(LookupError):
        flight.FlightRecorder(fresh.model).restore()
    torch.save({"not": "a snapshot"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a flight-recorder snapshot"):
        other.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("before", ["nothing", "uniform", "one_gaussian"])
def test_numpy_and_python_draws_in_a_step_are_the_same_after_a_restore(before: str) -> None:
    # numpy's state is read in full only when it moved; a cached Gaussian (one_gaussian: the second of
    # a pair, consumed without moving the generator) must still come back
    import random

    import numpy as np

    np.random.seed(3)
    random.seed(3)
    if before == "uniform":
        np.random.rand()
    elif before == "one_gaussian":
        np.random.standard_normal()
    model = torch.nn.Linear(2, 2)
    rec = flight.FlightRecorder(model)
    draws = []
    for _ in range(3):  # the state unmoved between snapshots too: the reused read must still be right
        with rec.step():
            draws.append((np.random.standard_normal(), np.random.rand(), random.random()))
        rec.restore()
        again = (np.random.standard_normal(), np.random.rand(), random.random())
        assert again == draws[-1]
        with rec.step():
            pass  # a step that draws nothing
    assert len(set(draws)) == 3


def test_a_step_that_only_takes_numpys_cached_gaussian_leaves_the_next_snapshot_right() -> None:
    import numpy as np

    np.random.seed(4)
    np.random.standard_normal()  # the pair's second value is cached now
    rec = flight.FlightRecorder(torch.nn.Linear(2, 2))
    with rec.step():
        np.random.standard_normal()  # takes the cached value: the generator itself does not move
    with rec.step():
        drawn = np.random.standard_normal()
    rec.restore()
    assert np.random.standard_normal() == drawn


def _lr_moving_run(every: int, keep: int, steps: int) -> tuple[Trainer, flight.FlightRecorder, list[list[torch.Tensor]]]:
    """`steps` noisy tiny-GPT steps under a recorder with a checkpoint every `every` steps, the learning
    rate moved between steps (as a scheduler does); the state after each step."""
    mc = GPTConfig.tiny()
    tr = Trainer(mc, TrainConfig(), seed=1)
    tr.step(*data.batch(mc, 1, 99, batch_size=4))  # AdamW's state exists: a checkpoint may reuse a slot
    rec = flight.FlightRecorder(tr.model, tr.opt, keep=keep, every=every)
    after = []
    for s in range(steps):
        for g in tr.opt.param_groups:
            g["lr"] = 1e-3 * (1 + s)
        b = data.batch(mc, 1, s, batch_size=4)
        with rec.step(b):
            _noisy_step(tr, b)
        after.append(_state(tr))
    return tr, rec, after


def test_steps_between_checkpoints_are_recaptured_by_re_running_them_from_their_checkpoint(tmp_path: Path) -> None:
    tr, rec, after = _lr_moving_run(every=3, keep=3, steps=5)  # checkpoints at steps 0 and 3
    assert [(s.step, len(s.replay)) for s in rec.snapshots] == [(2, 2), (3, 0), (4, 1)]
    assert rec.snapshots[0].tensors is not rec.snapshots[1].tensors  # step 2 still starts from step 0's copy
    with pytest.raises(ValueError, match="re-running the 1 step"):
        rec.restore()
    torch.rand(5)  # the RNG moved on since
    step = lambda b: _noisy_step(tr, b)  # noqa: E731
    for snap, want in ((rec.snapshots[2], after[4]), (rec.snapshots[0], after[2])):
        rec.recapture(step, tmp_path / f"cap{snap.step}", snap=snap)
        assert all(torch.equal(a, b) for a, b in zip(want, _state(tr), strict=True)), snap.step
    # the learning rate each step ran with is part of what it is re-run with
    assert rec.materialize(rec.snapshots[0], step).groups[0]["lr"] == pytest.approx(3e-3)


def test_a_checkpoint_does_not_copy_into_a_slot_a_kept_step_still_starts_from() -> None:
    tr, rec, after = _lr_moving_run(every=3, keep=2, steps=4)  # step 3's checkpoint: step 2 starts from step 0's
    assert [(s.step, len(s.replay)) for s in rec.snapshots] == [(2, 2), (3, 0)]
    rec.restore(rec.snapshots[0], lambda b: _noisy_step(tr, b))
    _noisy_step(tr, rec.snapshots[0].batch)
    assert all(torch.equal(a, b) for a, b in zip(after[2], _state(tr), strict=True))


def test_a_restore_makes_the_next_step_a_checkpoint() -> None:
    tr, rec, _ = _lr_moving_run(every=4, keep=1, steps=2)
    rec.restore(rec.last, lambda b: _noisy_step(tr, b))  # the live state is not step 1's end any more
    b = data.batch(GPTConfig.tiny(), 1, 9, batch_size=4)
    with rec.step(b):
        _noisy_step(tr, b)
    assert rec.last.replay == () and rec.last.step == 2
    with pytest.raises(ZeroDivisionError):  # a step that raises: the error is the step's, the count moves on
        with rec.step(b):
            1 / 0  # noqa: B018
    assert rec.steps == 4 and len(rec.last.replay) == 1
    with pytest.raises(ValueError, match="every must be"):
        flight.FlightRecorder(tr.model, every=0)


@pytest.mark.parametrize("every", [1, 3])
def test_an_amp_step_whose_gradients_overflowed_is_recaptured_overflowing_with_its_grad_scaler(
        tmp_path: Path, every: int) -> None:
    # fp16 autocast with a GradScaler that doubles its scale after every clean step: it climbs until
    # the scaled gradients overflow, that step is skipped and the scale halved. Re-run at the halved
    # scale, that step would not overflow: it would update the parameters the live step left alone
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    rec = flight.FlightRecorder(model, opt, scaler=scaler, every=every)
    for s in range(80):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) * 30
        before = scaler.get_scale()
        with rec.step(x):
            step(x)
        if scaler.get_scale() < before and s >= every:  # this step overflowed and was skipped
            break
    else:
        pytest.fail("the scale never overflowed")
    after = [t.detach().clone() for t in model.parameters()]
    live_scale = scaler.get_scale()
    rec.recapture(step, tmp_path / "cap")
    assert scaler.get_scale() == live_scale
    assert all(torch.equal(a, b.detach()) for a, b in zip(after, model.parameters(), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_a_gpu_a_recaptured_step_draws_the_same_cuda_randoms_and_ends_bit_identical(tmp_path: Path) -> None:
    mc = GPTConfig.tiny()
    tr = Trainer(mc, TrainConfig(), seed=1, device="cuda")
    batches = [data.batch(mc, 1, s, batch_size=4, device="cuda") for s in range(3)]
    draws: list[torch.Tensor] = []

    def step(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        draws.append(torch.rand(64, device="cuda"))  # dropout's kind of draw: the CUDA generator's state
        return tr.step(*b)

    rec = flight.FlightRecorder(tr.model, tr.opt, keep=2)
    for b in batches:
        with rec.step(b):
            step(b)
    after, live_draw = _state(tr), draws[-1]
    torch.rand(64, device="cuda")  # the CUDA generator moved on since
    rec.recapture(step, tmp_path / "cap")
    assert torch.equal(draws[-1], live_draw)
    assert all(torch.equal(a, b) for a, b in zip(after, _state(tr), strict=True))
