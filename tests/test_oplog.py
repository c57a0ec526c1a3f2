"""The live op log (C++ RecordFunction callback) and the flight recorder's check of a re-execution against it."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import leave_group
from torch.utils._python_dispatch import TorchDispatchMode

from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.reproducers import flight
from chipcheck.reproducers import oplog as ol


def _trainer() -> tuple[Trainer, list[tuple[torch.Tensor, torch.Tensor]]]:
    mc = GPTConfig.tiny()
    return Trainer(mc, TrainConfig(), seed=1), [data.batch(mc, 1, s, batch_size=4) for s in range(3)]


def _log(fn) -> ol.OpLog:  # type: ignore[no-untyped-def]
    with ol.recording() as kept:
        fn()
    assert kept.result is not None
    return kept.result


def test_the_log_holds_every_top_level_op_of_a_step_forward_backward_and_optimizer() -> None:
    tr, (b, *_) = _trainer()
    log = _log(lambda: tr.step(*b))
    names = [o.name for o in log.ops]
    # forward, the backward ops autograd runs (inside its evaluate_function records), the optimizer
    assert names[0] == "aten::embedding" and "aten::nll_loss_backward" in names and "aten::mm" in names
    assert names[-1] == "aten::addcdiv_"
    first = log.op(0)
    assert first.inputs == (("Float", (256, 64)), ("Long", (4, 32)))
    assert first.line() == "#0 aten::embedding(Float[256, 64], Long[4, 32])"
    # the parts of a composite op are not top-level: linear is logged, its addmm/mm inside it is not
    assert "aten::linear" in names and "aten::addmm" not in names and "aten::matmul" not in names
    # the first step made the optimizer's state: the next one runs other ops (the log says which);
    # the steps after it run the same ops as each other; a smaller batch does not
    second = _log(lambda: tr.step(*b))
    diff = log.first_difference(second)
    assert diff is not None and diff[0] is not None and diff[0].name == "aten::empty"
    assert second.first_difference(_log(lambda: tr.step(*b))) is None
    x, y = b[0][:2], b[1][:2]
    diff = second.first_difference(_log(lambda: tr.step(x, y)))
    assert diff is not None and diff[0] is not None and diff[1] is not None
    assert diff[0].index == 0 and diff[1].inputs[1] == ("Long", (2, 32))


def test_ops_a_dispatch_mode_runs_inside_an_op_are_not_logged() -> None:
    class Busy(TorchDispatchMode):  # runs ops of its own inside each op, as a recorder or a fault injector does
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                out.detach().abs().sum()
            return out

    tr, (b, *_) = _trainer()
    x, _ = b
    with torch.no_grad():
        bare = _log(lambda: tr.model(x))
        with Busy():
            moded = _log(lambda: tr.model(x))
    assert len(bare) > 10 and bare.first_difference(moded) is None


def test_a_profiler_running_beside_the_log_still_sees_the_nested_ops_and_the_log_is_the_same() -> None:
    tr, (b, *_) = _trainer()
    tr.step(*b)  # the optimizer's state made: the steps below run the same ops
    bare = _log(lambda: tr.step(*b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = _log(lambda: tr.step(*b))
    seen = {e.name for e in prof.events()}
    # linear's t and matmul, nll_loss's forward run inside them: the log leaves them out, the profiler
    # must not lose them
    assert {"aten::linear", "aten::t", "aten::matmul", "aten::nll_loss_forward"} <= seen
    assert bare.first_difference(profiled) is None


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_lists_of_tensors_nested_tensors_and_other_threads_are_logged() -> None:
    a, b = torch.ones(3), torch.ones(2, 2)
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])

    def work() -> None:
        torch.mm(b, b)

    def step() -> None:
        torch._foreach_add_([a, a], 1.0)
        nt.mul(2)  # no sizes() to read: logged with its dtype (reading them raised inside the callback)
        t = threading.Thread(target=work)
        t.start()
        t.join()

    log = _log(step)
    ops = log.ops
    assert ops[0].name == "aten::_foreach_add_" and ops[0].inputs[0] == [("Float", (3,)), ("Float", (3,))]
    assert ops[1].name == "aten::mul" and ops[1].inputs == (("Float", "nested"), ("Long", ()))  # 2: a wrapped number
    assert ops[1].line() == "#1 aten::mul(Float nested, Long[])"
    (mm,) = [o for o in ops if o.name == "aten::mm"]
    assert mm.thread == 1 and mm.line().endswith("on thread 1")


def test_only_one_log_at_a_time_and_a_failing_step_still_ends_it() -> None:
    with pytest.raises(ZeroDivisionError):
        with ol.recording() as kept:
            torch.ones(2).add_(1)
            1 / 0  # noqa: B018
    assert kept.result is not None and [o.name for o in kept.result.ops] == ["aten::ones", "aten::add_"]
    with ol.recording():
        with pytest.raises(RuntimeError, match="already being kept"):
            with ol.recording():
                pass


@pytest.mark.parametrize("every", [1, 3])  # 3: the last step is kept by its inputs, re-run from step 0's copy
def test_a_flight_recorder_with_the_op_log_checks_its_re_execution_against_the_live_step(
        tmp_path: Path, every: int) -> None:
    tr, batches = _trainer()
    rec = flight.FlightRecorder(tr.model, tr.opt, oplog=True, every=every)
    for b in batches:
        with rec.step(b):
            tr.step(*b)
    assert rec.last.oplog is not None and len(rec.last.oplog) > 300
    assert len(rec.last.replay) == (0 if every == 1 else len(batches) - 1)
    where = rec.recapture(lambda b: tr.step(*b), tmp_path / "cap")
    assert where is not None and rec.path_check is not None and rec.path_check.same
    checked = (tmp_path / "cap" / "path-check.txt").read_text().splitlines()
    assert checked[-1].startswith("same ops as the live step")
    assert len(checked) == len(rec.last.replay) + 1  # each step re-run to reach it, checked too
    # the op log travels with a saved snapshot
    saved = rec.load(rec.save(tmp_path / "snap.pt"))
    assert saved.oplog is not None and saved.oplog.first_difference(rec.snapshots[0].oplog) is None  # type: ignore[arg-type]

    # a step that depends on state the snapshot does not hold (here a flag; in real code a counter,
    # a data loader's position): the re-execution runs other ops, and says where it parts
    halve = [True]
    half = batches[-1][0][:2], batches[-1][1][:2]

    def step(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return tr.step(*half) if halve[0] else tr.step(*b)

    with pytest.warns(UserWarning, match="not the live step"):
        rec.recapture(step, tmp_path / "cap2")
    check = rec.path_check
    assert check is not None and not check.same and check.live is not None and check.here is not None
    assert check.live.index == 0 and check.here.inputs[1] == ("Long", (2, 32))
    assert "not the live step" in (tmp_path / "cap2" / "path-check.txt").read_text()


def test_a_step_re_run_to_reach_the_recaptured_one_is_checked_against_its_live_ops(tmp_path: Path) -> None:
    # every=3: step 2 is reached by re-running steps 0 and 1 from step 0's copy; live, step 1 took half
    # its batch (a loader quirk the snapshot cannot see), so its re-run is another step, and so is the
    # state step 2 starts from, though step 2 itself runs the ops it ran live
    tr, batches = _trainer()
    rec = flight.FlightRecorder(tr.model, tr.opt, oplog=True, every=3)
    calls = [0]

    def step(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls[0] += 1
        return tr.step(b[0][:2], b[1][:2]) if calls[0] == 2 else tr.step(*b)

    for b in batches:
        with rec.step(b):
            step(b)
    with pytest.warns(UserWarning, match="re-run to reach step 2, step 1 is not the live step"):
        rec.recapture(step, tmp_path / "cap")
    assert rec.path_check is not None and rec.path_check.same
    text = (tmp_path / "cap" / "path-check.txt").read_text()
    assert "step 0 (re-run from its checkpoint): same ops" in text
    assert "step 1 (re-run from its checkpoint): not the live step" in text


def test_a_recorder_without_the_log_checks_nothing_and_an_unbuildable_log_is_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr, batches = _trainer()
    rec = flight.FlightRecorder(tr.model, tr.opt)
    with rec.step(batches[0]):
        tr.step(*batches[0])
    assert rec.last.oplog is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.recapture(lambda b: tr.step(*b), tmp_path / "cap")
    assert rec.path_check is None and not (tmp_path / "cap" / "path-check.txt").exists()
    with pytest.raises(ValueError, match="no live op log"):
        rec.check_path(lambda b: tr.step(*b))

    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler, no ninja
    with pytest.raises(ol.OpLogUnavailable, match="needs ninja"):
        ol._build()
    monkeypatch.setattr(ol, "available", lambda: "the live op log is compiled on first use and needs c++: ...")
    with pytest.raises(ol.OpLogUnavailable, match="needs c\\+\\+"):
        flight.FlightRecorder(tr.model, tr.opt, oplog=True)


def _hf_rank(rank: int, world: int, root: str, mode: str, every: int) -> None:
    import torch.distributed as dist
    from test_repro_hf import _model, _state, _step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    model, opt = _model(mode)
    if every > 1:
        # FSDP2's first step initialises it lazily (ops a re-run of that step does not run again: the
        # path check rightly says the re-run is not the live step); a recorder on a run starts later
        _step(model, opt, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(99 + rank)))
    rec = flight.FlightRecorder(model, opt, oplog=True, every=every)
    for s in range(3):  # from the second on, each snapshot is one fused copy into the previous one's memory
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(10 * s + rank))
        with rec.step(ids):
            _step(model, opt, ids)
    after = [t.clone() for t in _state(model)]
    live = rec.last.oplog
    collective = {"ddp": "c10d::allreduce_", "fsdp2": "c10d::_reduce_scatter_base_"}[mode]
    assert live is not None and any(o.name == collective for o in live.ops), {o.name for o in live.ops}
    # both ranks re-execute (their collectives pair up); the step ends where the live one did
    where = rec.recapture(lambda b: _step(model, opt, b), f"{root}/rank{rank}")
    assert where is not None and rec.path_check is not None and rec.path_check.same, rec.path_check
    assert all(torch.equal(a, b) for a, b in zip(after, _state(model), strict=True)), f"rank {rank}: not the live step"
    leave_group()


@pytest.mark.parametrize(("mode", "every"), [("ddp", 1), ("fsdp2", 1), ("fsdp2", 3)])
def test_a_huggingface_gpt2_on_two_ranks_re_executes_the_ops_it_ran_live(tmp_path: Path, mode: str, every: int) -> None:
    """DDP and FSDP2 (whose parameters are DTensors: the snapshot's fused copy raised into the step for
    them, there is no sharding rule for it; their local shards are copied now). every=3: the last step
    is reached by re-running two FSDP2 steps (their collectives, storage freed and re-allocated) on
    both ranks from step 0's copy."""
    pytest.importorskip("transformers")
    import torch.multiprocessing as mp

    mp.start_processes(_hf_rank, args=(2, str(tmp_path / "x"), mode, every), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        checked = (tmp_path / "x" / f"rank{rank}" / "path-check.txt").read_text().splitlines()
        assert len(checked) == (1 if every == 1 else 3) and all("same ops as the live step" in c for c in checked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("every", [1, 3])  # 3: two CUDA steps re-run from step 0's device copy first
def test_on_a_gpu_the_backward_thread_is_logged_apart_and_a_re_execution_matches(tmp_path: Path, every: int) -> None:
    mc = GPTConfig.tiny()
    tr = Trainer(mc, TrainConfig(), seed=1, device="cuda")
    batches = [data.batch(mc, 1, s, batch_size=4, device="cuda") for s in range(3)]
    rec = flight.FlightRecorder(tr.model, tr.opt, oplog=True, every=every)
    for b in batches:
        with rec.step(b):
            tr.step(*b)
    live = rec.last.oplog
    assert live is not None
    # autograd runs CUDA backward on its device thread: those ops are logged as another thread's
    assert {o.thread for o in live.ops} == {0, 1}
    assert any(o.name == "aten::mm" and o.thread == 1 for o in live.ops)
    rec.recapture(lambda b: tr.step(*b), tmp_path / "cap")
    assert rec.path_check is not None and rec.path_check.same, rec.path_check
    assert all(c.same for _, c in rec.replay_checks) and len(rec.replay_checks) == (0 if every == 1 else 2)
