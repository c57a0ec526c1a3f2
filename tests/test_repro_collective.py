"""A corrupted collective on one rank of a real gloo group shrinks to a single file of the same group
size and reduction: all_reduce (sum over 2 ranks, max and product over 3), and over 3 ranks an
all-gather, a reduce-scatter, a broadcast and an all-to-all (each file fails with the simulated bad link and passes
without it); a healthy group's capture yields no reproducer."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import leave_group, run_cli

from chipcheck.reproducers import emit
from chipcheck.reproducers import shrink as sk

SPEC = "bitflip:rank=1,bit={bit},op=allreduce_,index=3,count=1"
BIT = {"sum": 25, "max": 30, "product": 25}
"""max: bit 30 of a value in (0.5, 1.5) makes it ~1e38, so the bad payload is the maximum."""


def _run_file(tmp_path: Path, case: sk.CollectiveCase, inject: str) -> tuple[str, str]:
    """The case's repro.py run with the simulated bad link (it must fail) and without (it must pass):
    what each printed."""
    path = tmp_path / "repro.py"
    path.write_text(emit.render_collective(case, metric_line=case.divergence.metric.line()))
    bad = subprocess.run([sys.executable, str(path), "--inject", inject],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert bad.returncode == 1 and "REPRODUCED" in bad.stdout, bad.stdout + bad.stderr
    good = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    return bad.stdout, good.stdout


def _rank(rank: int, world: int, port: int, root: str, red: str = "sum") -> None:
    import torch.distributed as dist

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    # A file rendezvous beside the capture: no port to race for with tests running beside it.
    dist.init_process_group("gloo", init_method=f"file://{root}-pg-{port}", rank=rank, world_size=world)
    w = g.uniform((16, 16), 11, "w", device="cpu")
    x = g.uniform((8, 16), 11 + rank, "x", device="cpu")
    inj = faults.make_injector(faults.parse(SPEC.format(bit=BIT[red])), rank, "repro")
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            grad = torch.sigmoid((x @ w).sum(dim=0)) + 0.5  # a rank-local "gradient", in (0.5, 1.5)
            dist.all_reduce(grad, op=getattr(dist.ReduceOp, red.upper()))
            grad.div_(world)
    leave_group()


@pytest.mark.parametrize(("world", "red"), [(2, "sum"), (3, "max"), (3, "product")])
def test_corrupted_all_reduce_becomes_a_file_of_its_group_size_and_reduction(tmp_path: Path, world: int,
                                                                             red: str, monkeypatch) -> None:
    root = tmp_path / "cap"
    monkeypatch.setenv("NCCL_ALGO", "Ring")  # NCCL's reduction order: the file runs under it as recorded
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(world, port, str(root), red), nprocs=world, start_method="spawn")
    case = sk.shrink_collective(str(root))
    assert case.world == world and case.op == "c10d.allreduce_.default" and case.divergence.reduce_op == red
    assert case.divergence.metric.bad == 1 and case.divergence.metric.bad_indices == [[3]]
    assert case.env == {"NCCL_ALGO": "Ring"}
    bad, good = _run_file(tmp_path, case, f"bitflip:rank=1,bit={BIT[red]},index=3")
    text = (tmp_path / "repro.py").read_text()
    assert 'ENV = {"NCCL_ALGO": "Ring"}' in text and "Environment: NCCL_ALGO=Ring (as recorded" in text
    assert all(f"rank {r}/{world} all_reduce ({red})" in bad for r in range(world))
    assert good.count(f"agrees with the exact {red}") == world
    if world == 2:  # the CLI tries the file without each recorded variable: gloo's sum never needed NCCL's
        out = tmp_path / "cli.py"
        p = _cli_writes_a_verified_file(root, SPEC.format(bit=BIT[red]), out)
        assert "NCCL_ALGO=Ring: not needed, dropped (the file still fails without it)" in p.stdout, p.stdout
        text = out.read_text()
        assert "ENV = {}" in text and "Environment: none (not needed, dropped: NCCL_ALGO)" in text


MOVES = {"_allgather_base_": "all_gather", "_reduce_scatter_base_": "reduce_scatter", "broadcast_": "broadcast",
         "alltoall_base_": "all_to_all"}


def _moves_rank(rank: int, world: int, root: str, op: str) -> None:
    """A step of 3 ranks that gathers activations, reduce-scatters them, broadcasts from rank 1 and
    exchanges the gathered buffer all-to-all;
    `op` (a c10d op) sends a flipped bit from rank 1 once, or nothing ("none")."""
    import torch.distributed as dist

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    w = g.uniform((16, 16), 11, "w", device="cpu")
    x = g.uniform((8, 16), 11 + rank, "x", device="cpu")
    inj = faults.make_injector(faults.parse(f"bitflip:rank=1,bit=25,op={op},index=3,count=1"), rank, "repro") \
        if op != "none" else None
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            h = torch.sigmoid(x @ w)
            full = torch.empty(world * h.numel())
            dist.all_gather_into_tensor(full, h.reshape(-1))
            part = torch.empty(h.numel())
            dist.reduce_scatter_tensor(part, full * (rank + 1))
            dist.broadcast(part, src=1)
            part.mul_(2)
            mixed = torch.empty_like(full)
            dist.all_to_all_single(mixed, full)  # chunk k of every rank to rank k
            mixed.mul_(2)
    leave_group()


@pytest.mark.parametrize("op", [*MOVES, "none"])
def test_a_corrupted_gather_scatter_or_broadcast_becomes_a_file_and_a_clean_one_does_not(tmp_path: Path,
                                                                                         op: str) -> None:
    root = tmp_path / "cap"
    mp.start_processes(_moves_rank, args=(3, str(root), op), nprocs=3, start_method="spawn")
    if op == "none":  # every collective of a healthy group agrees with its exact result: nothing to blame
        with pytest.raises(sk.NotReproducible, match="matches the exact result"):
            sk.shrink_collective(str(root))
        return
    case = sk.shrink_collective(str(root))
    kind = MOVES[op]
    assert case.op == f"c10d.{op}.default" and case.divergence.collective == kind and case.world == 3
    if kind in ("all_gather", "all_to_all"):
        assert "wrong in the part from rank 1" in case.divergence.metric.message
    if kind == "broadcast":
        assert case.divergence.source == 1
    bad, good = _run_file(tmp_path, case, "bitflip:rank=1,bit=25,index=3")
    assert all(f"rank {r}/3 {kind}" in bad for r in range(3)) and good.count("agrees with") == 3, bad + good


SUBGROUP_FAULTS = {  # name: rank 3's fault (its first all-reduce is its pair's, its second the world's)
    "pair": "bitflip:rank=3,bit=25,op=allreduce_,index=3,count=1",
    "world": "bitflip:rank=3,bit=25,op=allreduce_,index=3,after=1,count=1",
    "none": "",
    "send": "bitflip:rank=0,bit=25,op=send,index=3,count=1",  # what rank 0 sends rank 2
}


def _subgroups_rank(rank: int, world: int, root: str, fault: str) -> None:
    """4 ranks as 2 tensor-parallel pairs ({0, 1}, {2, 3}) inside one data-parallel world: each step
    all-reduces within its pair, rank 0 sends a pipeline-style activation to rank 2, then every rank
    all-reduces over the world (the ranks' k-th calls are on different groups, or are p2p)."""
    import torch.distributed as dist

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # collective: every rank makes both
    tp = pairs[rank // 2]
    w = g.uniform((16, 16), 11, "w", device="cpu")
    x = g.uniform((8, 16), 11 + rank, "x", device="cpu")
    inj = faults.make_injector(faults.parse(SUBGROUP_FAULTS[fault]), rank, "repro") if SUBGROUP_FAULTS[fault] else None
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            h = torch.sigmoid(x @ w).sum(dim=0)
            dist.all_reduce(h, group=tp)
            if rank == 0:
                dist.send(h, 2)
            elif rank == 2:
                dist.recv(h, 0)
            grad = h * 0.5
            dist.all_reduce(grad)
            grad.div_(world)
    leave_group()


@pytest.mark.parametrize("fault", ["pair", "world", "none"])
def test_subgroup_collectives_line_up_per_group_and_a_fault_in_one_becomes_a_file_of_its_size(
        tmp_path: Path, fault: str) -> None:
    root = tmp_path / "cap"
    mp.start_processes(_subgroups_rank, args=(4, str(root), fault), nprocs=4, start_method="spawn")
    if fault == "none":  # every call of both pairs and of the world agrees with its exact result
        with pytest.raises(sk.NotReproducible, match="matches the exact result"):
            sk.shrink_collective(str(root))
        return
    case = sk.shrink_collective(str(root))
    # pair: the pair {2, 3}'s all-reduce, 2 ranks (not the 4 captured); world: the world's, after the p2p
    size = 2 if fault == "pair" else 4
    assert case.op == "c10d.allreduce_.default" and case.world == size
    assert case.divergence.rank in ((2, 3) if fault == "pair" else range(4))
    assert case.divergence.metric.bad_indices == [[3]]
    _, good = _run_file(tmp_path, case, f"bitflip:rank={size - 1},bit=25,index=3")
    assert good.count("agrees with the exact sum") == size, good
    if fault == "pair":  # the CLI verifies the file with the fault moved onto the file's rank (rank 3 -> 1)
        _cli_writes_a_verified_file(root, SUBGROUP_FAULTS[fault], tmp_path / "cli.py")


def _cli_writes_a_verified_file(root: Path, spec: str, out: Path) -> Any:
    p = run_cli("repro", "shrink", str(root), "--collective", "--inject", spec, "-o", str(out), timeout=600)
    assert p.returncode == 0 and out.exists(), p.stdout + p.stderr
    assert "verified: `python repro.py" in p.stdout and "exit 1" in p.stdout, p.stdout
    return p


def test_a_corrupted_send_becomes_a_two_rank_file_naming_sender_and_receiver(tmp_path: Path) -> None:
    """The pipeline-style send from rank 0 to rank 2 in the 4-rank step above, a bit flipped on the way:
    the receive is checked against what was sent (the collectives around it agree with their inputs)."""
    root = tmp_path / "cap"
    mp.start_processes(_subgroups_rank, args=(4, str(root), "send"), nprocs=4, start_method="spawn")
    case = sk.shrink_collective(str(root))
    div = case.divergence
    assert case.op == "c10d.recv_.default" and case.world == 2 and div.collective == "send_recv"
    assert div.rank == 2 and div.metric.bad_indices == [[3]] and div.metric.flipped_bits == {25: 1}
    assert "what rank 2 received from rank 0 differs from what rank 0 sent" in div.metric.message
    _, good = _run_file(tmp_path, case, "bitflip:rank=0,bit=25,index=3")
    assert good.count("agrees with") == 2, good
    _cli_writes_a_verified_file(root, SUBGROUP_FAULTS["send"], tmp_path / "cli.py")


def _early_irecv_rank(rank: int, world: int, root: str) -> None:
    """Rank 1 posts an irecv and computes before it waits; rank 0 sends only after a barrier rank 1
    reaches after that computation: the capture records the received tensor before it lands."""
    import torch.distributed as dist

    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    h = torch.full((8,), 1.0 + rank)
    with capture(root):
        if rank == 0:
            dist.barrier()
            dist.send(h * 3, 1)
        else:
            req = dist.irecv(h, 0)
            early = h * 2  # the next op: the receive is recorded here, not yet landed
            dist.barrier()
            req.wait()
            early.add_(h)
    leave_group()


def test_a_receive_recorded_before_it_landed_is_not_judged(tmp_path: Path) -> None:
    """What an irecv held when the capture recorded it is not what was sent; comparing the two would
    blame a healthy link. It is listed as not judged instead."""
    root = tmp_path / "cap"
    mp.start_processes(_early_irecv_rank, args=(2, str(root)), nprocs=2, start_method="spawn")
    with pytest.raises(sk.NotReproducible, match="recorded before it landed"):
        sk.shrink_collective(str(root))


def _gather_rank(rank: int, world: int, root: str) -> None:
    """Ranks 0 and 1 each send rank 2 a tensor; rank 2 takes them in whatever order they come
    (`dist.recv` with no source, as a parameter server or a gather by hand does). Rank 1's send
    has a bit flipped once."""
    import torch.distributed as dist

    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    inj = faults.make_injector(faults.parse("bitflip:rank=1,bit=25,op=send,index=2,count=1"), rank, "repro")
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            h = torch.sigmoid(torch.arange(8.0) + rank)
            if rank < 2:
                dist.send(h * 2, 2)
            else:
                got = [torch.empty(8), torch.empty(8)]
                for t in got:
                    dist.recv(t)  # from any source
                h = h + got[0] + got[1]
    leave_group()


def test_a_receive_from_any_source_is_checked_against_the_rank_it_came_from(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    mp.start_processes(_gather_rank, args=(3, str(root)), nprocs=3, start_method="spawn")
    case = sk.shrink_collective(str(root))
    div = case.divergence
    assert case.op == "c10d.recv_any_source_.default" and case.world == 2 and div.collective == "send_recv"
    assert div.members == [1, 2] and div.metric.bad_indices == [[2]] and div.metric.flipped_bits == {25: 1}
    assert "what rank 2 received from rank 1 differs from what rank 1 sent" in div.metric.message
    _run_file(tmp_path, case, "bitflip:rank=0,bit=25,index=2")


def _rows(sender: int, receiver: int, form: str = "single") -> int:
    """Tokens rank `sender` routes to rank `receiver` in the MoE-style step below (1 to 3, uneven; 2
    through the list form)."""
    return (sender + 2 * receiver) % 3 + 1 if form == "single" else 2


def _moe_rank(rank: int, world: int, root: str, fault: bool, form: str) -> None:
    """An expert-parallel dispatch: each rank routes an uneven number of 4-wide token rows to every
    rank (`all_to_all_single` with split sizes), or 2 rows to each through the list form `all_to_all`
    (one tensor per rank; gloo's takes equal sizes only, NCCL's any), the receiving experts scale them. With `fault`, rank 1 flips a bit of the first row it sends (to
    rank 0) once."""
    import torch.distributed as dist

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    sends = [_rows(rank, k, form) for k in range(world)]
    receives = [_rows(j, rank, form) for j in range(world)]
    x = g.uniform((sum(sends), 4), 11 + rank, "tokens", device="cpu")
    spec = f"bitflip:rank=1,bit=25,op={'alltoall_base_' if form == 'single' else 'alltoall_'},index=3,count=1"
    inj = faults.make_injector(faults.parse(spec), rank, "repro") if fault else None
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            tokens = torch.sigmoid(x)
            if form == "single":
                got = torch.empty((sum(receives), 4))
                dist.all_to_all_single(got, tokens, output_split_sizes=receives, input_split_sizes=sends)
                got.mul_(2)
            else:
                parts = [torch.empty((n, 4)) for n in receives]
                dist.all_to_all(parts, list(tokens.split(sends)))
                torch.cat(parts).mul_(2)
    leave_group()


@pytest.mark.parametrize(("fault", "form"), [(True, "single"), (False, "single"), (True, "list"), (False, "list")])
def test_an_uneven_all_to_all_is_checked_and_a_corrupted_one_becomes_a_file(tmp_path: Path, fault: bool,
                                                                            form: str) -> None:
    root = tmp_path / "cap"
    mp.start_processes(_moe_rank, args=(3, str(root), fault, form), nprocs=3, start_method="spawn")
    if not fault:
        with pytest.raises(sk.NotReproducible, match="matches the exact result"):
            sk.shrink_collective(str(root))
        return
    case = sk.shrink_collective(str(root))
    div = case.divergence
    assert div.collective == "all_to_all" and case.world == 3 and div.rank == 0
    per = 1 if form == "single" else 4  # rows of the tensor, or elements of the list's tensors
    assert div.splits == [[_rows(j, k, form) * per for k in range(3)] for j in range(3)]
    assert case.op == f"c10d.{'alltoall_base_' if form == 'single' else 'alltoall_'}.default"
    assert "wrong in the part from rank 1" in div.metric.message and div.metric.bad == 1
    _, good = _run_file(tmp_path, case, "bitflip:rank=1,bit=25,index=3")
    assert good.count("agrees with") == 3, good


COALESCED = {"allreduce_coalesced_": "all_reduce", "allgather_into_tensor_coalesced_": "all_gather",
             "reduce_scatter_tensor_coalesced_": "reduce_scatter"}


def _coalesced_rank(rank: int, world: int, root: str, op: str) -> None:
    """A ZeRO-style step of 3 ranks: two gradients all-reduced in one coalesced call, then two shards
    gathered and two buffers reduce-scattered, each pair coalesced (`_coalescing_manager`). `op` (a
    c10d coalesced op) sends a flipped bit from rank 1's first tensor once, or nothing ("none")."""
    import torch.distributed as dist

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    x = g.uniform((6, 8), 11 + rank, "x", device="cpu")
    inj = faults.make_injector(faults.parse(f"bitflip:rank=1,bit=25,op={op},index=3,count=1"), rank, "repro") \
        if op != "none" else None
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            a, b = torch.sigmoid(x[:3]).reshape(-1), torch.sigmoid(x[3:]).sum(dim=0)
            dist.all_reduce_coalesced([a, b])
            full = [torch.empty(world * a.numel()), torch.empty(world * b.numel())]
            with dist._coalescing_manager():
                dist.all_gather_into_tensor(full[0], a * 2)
                dist.all_gather_into_tensor(full[1], b * 2)
            part = [torch.empty(a.numel()), torch.empty(b.numel())]
            with dist._coalescing_manager():
                dist.reduce_scatter_tensor(part[0], full[0])
                dist.reduce_scatter_tensor(part[1], full[1])
            (part[0].sum() + part[1].sum()).item()
    leave_group()


@pytest.mark.parametrize("op", [*COALESCED, "none"])
def test_a_corrupted_coalesced_collective_becomes_a_file_and_a_clean_one_does_not(tmp_path: Path, op: str) -> None:
    _three_ranks_one_corrupted_call(tmp_path, _coalesced_rank, op, f"c10d.{op}.default", COALESCED.get(op, ""))


def _three_ranks_one_corrupted_call(tmp_path: Path, rank_fn: Any, op: str, recorded: str, kind: str) -> None:
    """3 ranks run `rank_fn` with `op` corrupted once on rank 1 ("none": clean): the capture shrinks to
    a 3-rank file of that `kind` of collective that fails with the fault and passes without; a clean
    capture to no file, every call judged."""
    root = tmp_path / "cap"
    mp.start_processes(rank_fn, args=(3, str(root), op), nprocs=3, start_method="spawn")
    if op == "none":
        with pytest.raises(sk.NotReproducible, match="matches the exact result") as e:
            sk.shrink_collective(str(root))
        assert "not judged" not in str(e.value), str(e.value)
        return
    case = sk.shrink_collective(str(root))
    div = case.divergence
    assert case.op == recorded and div.collective == kind and case.world == 3
    assert div.metric.bad == 1 and div.output == 0, div.metric.line()
    bad, good = _run_file(tmp_path, case, "bitflip:rank=1,bit=25,index=3")
    assert all(f"rank {r}/3 {kind}" in bad for r in range(3)) and good.count("agrees with") == 3, bad + good


FUNCTIONAL = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
              "reduce_scatter_tensor": "reduce_scatter", "all_reduce_coalesced": "all_reduce",
              "all_gather_into_tensor_coalesced": "all_gather", "reduce_scatter_tensor_coalesced": "reduce_scatter",
              "broadcast": "broadcast", "all_to_all_single": "all_to_all"}


def _functional_rank(rank: int, world: int, root: str, op: str) -> None:
    """The same kind of step through the functional collectives (torch.distributed._functional_collectives,
    what DTensor's redistributions and compiled code issue): out-of-place, waited for when their
    result is used. `op` (a `_c10d_functional` op) sends a flipped bit from rank 1's first tensor once,
    or nothing ("none")."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from chipcheck import generator as g
    from chipcheck.probes import faults
    from chipcheck.reproducers import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}-pg", rank=rank, world_size=world)
    group = dist.group.WORLD
    x = g.uniform((6, 8), 11 + rank, "x", device="cpu")
    inj = faults.make_injector(faults.parse(f"bitflip:rank=1,bit=25,op={op},index=3,count=1"), rank, "repro") \
        if op != "none" else None
    with inj() if inj else contextlib.nullcontext():
        with capture(root):
            a, b = torch.sigmoid(x[:3]).reshape(-1), torch.sigmoid(x[3:]).sum(dim=0)
            s = funcol.all_reduce(a, "sum", group) * 1
            full = funcol.all_gather_tensor(b * 2, 0, group) * 1
            part = funcol.reduce_scatter_tensor(s.reshape(3, 8) * 1, "sum", 0, group) * 1
            ca, cb = funcol.all_reduce_coalesced([a * 3, b * 3], "sum", group)
            ga, gb = funcol.all_gather_into_tensor_coalesced([a * 4, b * 4], group)
            ra, rb = funcol.reduce_scatter_tensor_coalesced([ga * 1, gb * 1], "sum", [0, 0], group)
            bc = funcol.broadcast(a * 5, 1, group) * 1  # from rank 1: what the fault corrupts is sent
            aa = funcol.all_to_all_single(a * 6, None, None, group) * 1
            (s.sum() + full.sum() + part.sum() + ca.sum() + cb.sum() + ra.sum() + rb.sum() + bc.sum() + aa.sum()).item()
    leave_group()


@pytest.mark.parametrize("op", [*FUNCTIONAL, "none"])
def test_a_corrupted_functional_collective_becomes_a_file_and_a_clean_one_does_not(tmp_path: Path, op: str) -> None:
    _three_ranks_one_corrupted_call(tmp_path, _functional_rank, op, f"_c10d_functional.{op}.default",
                                    FUNCTIONAL.get(op, ""))
