"""The --inject grammar: valid specs parse, malformed ones fail with a fix-it message."""

from __future__ import annotations

import pytest
import torch

from chipcheck.probes import faults


def test_parse_examples_from_the_docs() -> None:
    (f,) = faults.parse("bitflip:rank=2,bit=20,rate=0.01")
    assert (f.kind, f.ranks, f.bit, f.rate) == ("bitflip", (2,), 20, 0.01)
    (s,) = faults.parse("slow:rank=1,factor=1.3")
    assert s.factor == 1.3 and s.applies_to(1, "matmul") and not s.applies_to(0, "matmul")
    two = faults.parse("nan:rank=0; hang:rank=1|3")
    assert [x.kind for x in two] == ["nan", "hang"] and two[1].ranks == (1, 3)
    assert faults.parse("stuck:bit=3,value=0")[0].rate == 1e-3
    (t,) = faults.parse("slow:rank=1,factor=2,after_s=1.5,scope=process")
    assert t.after_s == 1.5 and faults.parse(t.spec()) == [t]


def test_after_s_spares_calls_until_that_second_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv(faults.EPOCH_ENV, repr(time.time() - 10.0))  # the run began 10 s ago
    a = torch.eye(8)
    late = faults.make_injector(faults.parse("bitflip:bit=30,after_s=60"), 0, "matmul")
    with late():
        assert torch.equal(a @ a, a)  # 10 s into the run: not yet
    due = faults.make_injector(faults.parse("bitflip:bit=30,after_s=5"), 0, "matmul")
    with due():
        bad = a @ a
    assert not torch.equal(bad, a)


def test_the_jax_paths_injector_fires_as_the_torch_paths_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """One firing rule (probes/faults/firing.py) for both injectors. The JAX path's used to slow every dtype
    for a `dtype=bfloat16` slow fault (`chipcheck run --backend jax` with it retested and confirmed the chip
    on float16 GEMMs) and ignored `every`, `after_s` and `chance`."""
    import time

    from chipcheck.probes import jax_backend as jb

    def fired(spec: str, dtypes: list[str]) -> list[int]:
        inj = jb.Injector.for_rank(faults.parse(spec), 0, "matmul")
        return [i for i, d in enumerate(dtypes) if inj.begin("dot_general", d) > 1.0 or inj.due]

    mixed = ["float32", "bfloat16"] * 4
    assert fired("slow:factor=3,dtype=bfloat16", mixed) == [1, 3, 5, 7]  # its fp32 GEMMs at full speed
    # every 2nd matching call: counted over the bf16 calls only, as the torch path counts them
    assert fired("bitflip:bit=3,dtype=bfloat16,every=2", mixed) == [1, 5]
    a = torch.eye(8)
    calls = []
    with faults.make_injector(faults.parse("bitflip:bit=3,dtype=float32,every=2,at=call"), 0, "matmul")():
        for _ in range(4):
            calls.append(not torch.equal(a @ a, a))
            torch.eye(8, dtype=torch.bfloat16) @ torch.eye(8, dtype=torch.bfloat16)
    assert calls == [True, False, True, False]
    monkeypatch.setenv(faults.EPOCH_ENV, repr(time.time() - 10.0))  # the run began 10 s ago
    assert fired("slow:factor=3,after_s=60", ["float32"] * 3) == []
    assert fired("slow:factor=3,after_s=5", ["float32"] * 3) == [0, 1, 2]
    hits = fired("bitflip:bit=3,chance=0.25,seed=9", ["float32"] * 400)
    assert 60 < len(hits) < 140, len(hits)


@pytest.mark.parametrize("spec, words", [
    ("explode:rank=1", "unknown fault kind"),
    ("bitflip:rank=1", "needs bit"),
    ("bitflip:bit=x", "bad value for bit"),
    ("bitflip:bit=3,rate=2", "rate must be"),
    ("slow:factor=0.5", "factor > 1"),
    ("nan:colour=red", "not valid for nan"),
    ("nan:rank", "expected key=value"),
    ("slow:factor=2,after_s=-1", "after_s is a number"),
    ("slow:factor=2,after_s=nan", "after_s is a number"),
    ("", "empty"),
    ("bitflip:rank=1,bit=21,dtype=bfloat16", "bfloat16 has bits 0..15"),  # would never fire
    ("stuck:bit=8,value=1,dtype=float8_e4m3fn", "bits 0..7"),
])
def test_malformed_specs_say_what_to_fix(spec: str, words: str) -> None:
    with pytest.raises(faults.InjectSpecError, match=words):
        faults.parse(spec)


@pytest.mark.parametrize("dtype, bit", [(torch.float32, 31), (torch.float32, 0), (torch.bfloat16, 15),
                                        (torch.float16, 10)])
def test_bitflip_flips_exactly_that_bit_of_one_element(dtype: torch.dtype, bit: int) -> None:
    t = torch.ones(100, dtype=dtype)
    before = t.clone()
    faults.corrupt(faults.Fault(kind="bitflip", bit=bit), t, call=0)
    iv = {4: torch.int32, 2: torch.int16}[t.element_size()]
    xor = (t.view(iv) ^ before.view(iv)).to(torch.int64) & ((1 << (8 * t.element_size())) - 1)
    assert int((xor != 0).sum()) == 1
    assert int(xor[xor != 0][0]) == 1 << bit


def test_bit_beyond_the_dtype_leaves_it_alone() -> None:
    t = torch.ones(10, dtype=torch.bfloat16)
    faults.corrupt(faults.Fault(kind="bitflip", bit=20), t, call=0)
    assert torch.equal(t, torch.ones(10, dtype=torch.bfloat16))


def test_injector_corrupts_only_code_under_test_and_only_its_rank() -> None:
    inj = faults.make_injector(faults.parse("bitflip:rank=1,bit=30"), 1, "matmul")
    assert faults.make_injector(faults.parse("bitflip:rank=1,bit=30"), 0, "matmul") is None
    a = torch.eye(8)
    clean = a @ a
    with inj():
        bad = a @ a
    assert not torch.equal(bad, clean)
    assert torch.equal(a @ a, clean)  # outside the region nothing is touched


def test_process_scope_hits_every_matching_kernel_of_its_rank_only() -> None:
    fs = faults.parse("bitflip:rank=1,bit=30,dtype=float32,every=2,scope=process")
    assert faults.make_injector(fs, 1, "matmul") is None  # not a probe's fault: on for the whole process
    assert faults.process_injector(fs, 0) is None
    a = torch.eye(8)
    clean = a @ a
    stop = faults.start_process_faults(fs, 1)
    try:
        calls = [not torch.equal(a @ a, clean) for _ in range(6)]  # every 2nd fp32 GEMM, at call time
        half = torch.eye(8, dtype=torch.bfloat16)
        assert torch.equal(half @ half, half)  # another dtype is spared
    finally:
        stop()
    assert calls == [True, False, True, False, True, False]
    assert torch.equal(a @ a, clean)  # off again once the worker is done


def test_process_scope_and_recv_side_say_what_to_fix() -> None:
    with pytest.raises(faults.InjectSpecError, match="drop probe="):
        faults.parse("nan:rank=0,probe=matmul,scope=process")
    with pytest.raises(faults.InjectSpecError, match="side=recv needs"):
        faults.parse("bitflip:rank=0,bit=3,side=recv")
    with pytest.raises(faults.InjectSpecError, match="every must be"):
        faults.parse("bitflip:rank=0,bit=3,every=0")
    (f,) = faults.parse("bitflip:rank=2,bit=3,op=allreduce_,side=recv,scope=process,every=3")
    assert faults.parse(f.spec()) == [f]  # the spec a result records parses back to the same fault


def _slow_sender(rank: int, port: int, out: str) -> None:
    import json
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        buf, ack = torch.ones(1024), torch.zeros(1)
        if rank == 0:
            # the first send spared: a c10d op's first call under a dispatch mode sets itself up slowly
            stop = faults.start_process_faults(faults.parse("slow:rank=0,op=send,factor=3,after=1,scope=process"), 0)
            dist.send(buf, 1)
            dist.recv(ack, 1)
            t0 = time.perf_counter()
            dist.send(buf, 1)  # gloo's send ends when the peer has taken it: 0.3 s here
            dist.recv(ack, 1)
            took = time.perf_counter() - t0
            stop()
            with open(out, "w") as f:
                json.dump(took, f)
        else:
            for wait in (0.0, 0.3):
                time.sleep(wait)
                dist.recv(buf, 0)
                dist.send(ack, 0)
    finally:
        dist.destroy_process_group()


def test_a_slow_send_takes_factor_times_its_transfer_not_its_issue(tmp_path) -> None:
    # a throttled NIC: the send's work ends after the op returns (gloo and NCCL are asynchronous);
    # the lag is charged at the rank's next op, so a ping-pong timed by the sender sees it
    import json
    import random

    import torch.multiprocessing as mp

    out = tmp_path / "took.json"
    mp.spawn(_slow_sender, args=(random.randint(20000, 40000), str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) >= 0.3 * 3 * 0.95
