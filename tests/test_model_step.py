"""The model-step probes: clean runs pass; injected faults are caught and the bad rank is named;
a slow rank is flagged slow. In-process (with real spawned gloo ranks for model_dp) and end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import cpu_ctx, device, leave_group, run_json

from chipcheck.probes import base, faults
from chipcheck.probes.model_step import ModelDPProbe, ModelStepProbe, UserStep, checksum, register_step
from chipcheck.results import Oracle, Verdict


def _ctx(inject: str | None = None, probe: str = "model_step", rank: int = 0, **kw: object) -> base.ProbeContext:
    return cpu_ctx(probe, inject, seed=1, rank=rank, **kw)


def test_checksum_sees_every_bit_and_order() -> None:
    t = torch.linspace(-1, 1, 1000)
    base_sum = int(checksum([t]))
    flipped = t.clone()
    flipped.view(torch.int32)[123] ^= 1
    assert int(checksum([flipped])) != base_sum
    assert int(checksum([t.flip(0)])) != base_sum
    assert int(checksum([t[:500], t[500:]])) == base_sum


def test_model_step_clean_passes_with_metrics() -> None:
    probe = ModelStepProbe()
    cfg = probe.config("quick", "cpu", frozenset())
    out = probe.run_case(_ctx(), cfg, "fp32")
    assert out.verdict is Verdict.PASS, out.mismatches
    assert out.repeats == 2 and out.output_hash
    assert out.metrics["tflops_best"] >= out.metrics["tflops"] > 0 and out.metrics["tokens_per_s"] > 0
    assert "mfu" not in out.metrics  # no ceiling is known for CPUs
    assert out.metrics["ref_max_rel_err"] <= cfg.tol["fp32"]


def test_model_step_catches_an_exponent_flip_in_every_run() -> None:
    probe = ModelStepProbe()
    out = probe.run_case(_ctx("bitflip:bit=30,op=mm"), probe.config("quick", "cpu", frozenset()), "fp32")
    assert out.verdict is Verdict.WRONG
    assert {m.oracle for m in out.mismatches} >= {Oracle.REFERENCE}
    assert not out.output_hash  # a device its own oracles caught does not vote in consensus


def test_model_step_one_low_bit_flip_is_caught_by_repeat_determinism() -> None:
    # one mantissa bit in one backward GEMM of the second run: invisible to the fp64 tolerance,
    # not to the bitwise comparison of the two runs
    probe = ModelStepProbe()
    out = probe.run_case(_ctx("bitflip:bit=10,op=mm,after=150,count=1"), probe.config("quick", "cpu", frozenset()),
                         "fp32")
    assert out.verdict is Verdict.FLAKY and out.nondeterministic
    assert [m.oracle for m in out.mismatches] == [Oracle.REPEAT]


def test_user_step_registers_as_a_probe() -> None:
    @register_step("toy_step", steps=3)
    def build(dev: torch.device, seed: int) -> UserStep:
        torch.manual_seed(seed & 0x7FFFFFFF)
        lin = torch.nn.Linear(16, 16, device=dev)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        x = torch.randn(32, 16, device=dev)

        def step(i: int) -> torch.Tensor:
            opt.zero_grad()
            loss = (lin(x) ** 2).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        return UserStep(step=step, state=lambda: list(lin.parameters()), tokens_per_step=32,
                        flops_per_step=6.0 * 32 * 16 * 16)

    probe = base.get("toy_step")
    assert "toy_step" in faults.CALL_TIME_PROBES
    cfg = probe.config("quick", "cpu", frozenset())
    out = probe.run_case(_ctx(probe="toy_step"), cfg, "step")
    assert out.verdict is Verdict.PASS and out.output_hash and out.metrics["tflops_best"] > 0
    bad = probe.run_case(_ctx("bitflip:bit=30,op=addmm", probe="toy_step"), cfg, "step")
    assert bad.verdict is not Verdict.PASS


# ---- model_dp on real gloo ranks, in-process probe calls --------------------------------------



def _dp_rank(rank: int, world: int, out: str, inject: str, cases: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file rendezvous in the test's own directory: no port to race for with tests running beside it.
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    try:
        probe = ModelDPProbe()
        cfg = probe.config("quick", "cpu", frozenset())
        ctx = _ctx(inject or None, probe="model_dp", rank=rank, world_size=world, group=lambda: dist.group.WORLD)
        res = []
        for case in cases:
            o = probe.run_case(ctx, cfg, case)
            res.append({"case": case, "verdict": o.verdict.value, "hash": o.output_hash, "params": o.params,
                        "notes": [m.note for m in o.mismatches], "metrics": o.metrics,
                        "bits": [m.bit_histogram for m in o.mismatches]})
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(res, default=str))
    finally:
        leave_group()


def _dp(tmp_path: Path, world: int, inject: str, cases: list[str]) -> list[list[dict]]:
    mp.spawn(_dp_rank, args=(world, str(tmp_path), inject, cases), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_model_dp_optimizer_fault_names_the_diverging_replica(tmp_path: Path) -> None:
    # A fault after the all-reduce (in AdamW's first-moment update on rank 1) makes rank 1's
    # parameters drift from its replicas: the replica check names it, and re-synchronises it, so
    # ranks 0 and 2 pass (their training was never touched).
    res = _dp(tmp_path, 3, "bitflip:rank=1,bit=28,op=lerp_", ["dp/fp32"])
    assert [r[0]["verdict"] for r in res] == ["pass", "wrong", "pass"]
    assert any("replica check" in n and "rank 1" in n and "majority" in n for n in res[1][0]["notes"])
    assert res[0][0]["hash"] == res[2][0]["hash"] and res[0][0]["metrics"]["resynced"] >= 1


def test_model_dp_clean_tp_case_passes(tmp_path: Path) -> None:
    res = _dp(tmp_path, 2, "", ["tp2/fp32"])
    assert [r[0]["verdict"] for r in res] == ["pass", "pass"]
    assert res[0][0]["params"]["tp"] == 2 and res[0][0]["hash"] == res[1][0]["hash"]


# ---- end to end: the real CLI, one worker process per virtual device ---------------------------


def _probe(data: dict, rank: int, name: str) -> dict:
    return next(p for p in device(data, rank)["probes"] if p["probe"] == name)


def test_cli_clean_run_passes(tmp_path: Path) -> None:
    # --min-gap 0.5: this host is shared with other test runs; only a gross slowdown may count here
    code, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "model_step,model_dp",
                               "--min-gap", "0.5")
    assert code == 0, out
    assert [d["verdict"] for d in data["devices"]] == ["pass", "pass"]


def test_cli_backward_bitflip_on_one_rank_is_caught_and_named(tmp_path: Path) -> None:
    # Step 0 on rank 1: 27 GEMMs replaying rank 0's shard, then 9 forward GEMMs of its own shard;
    # call 40 is a backward GEMM of its own shard. One mantissa bit, once.
    spec = "bitflip:rank=1,bit=20,op=mm,probe=model_dp,after=40,count=1"
    code, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "model_step,model_dp",
                               "--inject", spec, "--min-gap", "0.5")
    assert code == 1, out
    assert device(data, 0)["verdict"] == "pass"
    assert device(data, 1)["verdict"] == "wrong"
    bad = _probe(data, 1, "model_dp")
    case = next(c for c in bad["details"]["cases"] if c["case"] == "dp/fp32")
    assert case["verdict"] == "wrong"
    note = case["mismatches"][0]["note"]
    assert "rank 1 (owner of shard 1; peer rank 0)" in note and "step=0" in note
    assert case["mismatches"][0]["bit_histogram"]  # the flipped gradient bits, diagnosed
    assert [c["verdict"] for c in bad["details"]["cases"] if c["case"] != "dp/fp32"] == ["pass", "pass"]


def test_replicas_split_two_against_two_blame_no_healthy_rank_by_a_rounding(tmp_path: Path) -> None:
    """Ranks 0 and 2 damage what their all-reduces deliver, so the replicas split with no majority and
    are not re-synchronised. The next gradient cross-checks then compare owners and checkers holding
    different parameters: both repeat their own result and the one a rounding farther from float64
    was named, every healthy rank with it (all four `wrong`). Such a dispute is now left to the
    replica check: no member has evidence of its own here, so all four are `suspect`, none `wrong`.
    Found from outside (benchmarks/bench_blame.py --together, recv-corrupt on ranks 0 and 2)."""
    code, data, out = run_json(tmp_path, "--devices", "cpu:4", "--probes", "model_dp", "--min-gap", "0.9", "--inject",
                               "bitflip:rank=0|2,bit=3,op=allreduce_,side=recv,scope=process")
    assert code == 1, out
    assert [d["verdict"] for d in data["devices"]] == ["suspect"] * 4
    probe = _probe(data, 1, "model_dp")
    assert probe["metrics"]["dp/fp32:diverged_disputes"] > 0
    dp = next(c for c in probe["details"]["cases"] if c["case"] == "dp/fp32")
    assert not any("cross-check" in m["note"] for m in dp["mismatches"])


@pytest.mark.timing
def test_cli_slow_rank_is_flagged_slow(tmp_path: Path) -> None:
    code, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "model_step,model_dp",
                               "--inject", "slow:rank=1,factor=4")
    assert code == 1, out
    assert device(data, 1)["verdict"] == "slow"
    assert device(data, 0)["verdict"] == "pass"
    # the model steps make it a suspect; the interleaved GEMM retest against rank 0 calls it slow
    verdicts = {p["probe"]: p["verdict"] for p in device(data, 1)["probes"]}
    assert verdicts == {"model_step": "pass", "model_dp": "pass", "retest": "slow"}


_USER_STEP = '''
import torch
from chipcheck.probes.model_step import UserStep, register_step

@register_step("cnn_step", steps=3)
def build(dev, seed):
    torch.manual_seed(seed & 0x7FFFFFFF)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).to(dev)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(seed & 0xFFFF)).to(dev)
    y = torch.arange(8, device=dev) % 10

    def step(i):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return UserStep(step=step, state=lambda: [*m.parameters(), *m.buffers()], tokens_per_step=8)
'''


def test_a_user_step_wrong_in_every_repeat_on_one_chip_is_wrong_there_only(tmp_path: Path) -> None:
    """A chip flipping a low bit in every 5th fp32 kernel it runs: each repeat of the user's step (which has
    no reference) is hit somewhere else, so on its own the device is only flaky; its three peers agree
    bit for bit on what neither repeat computed, so it is wrong, and no peer is named."""
    (tmp_path / "cnn_steps.py").write_text(_USER_STEP)
    env = {"CHIPCHECK_STEPS": "cnn_steps", "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code, data, out = run_json(tmp_path, "--devices", "cpu:4", "--probes", "cnn_step",
                               "--inject", "bitflip:rank=1,bit=15,dtype=float32,every=5,scope=process", env=env)
    assert code == 1, out
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "wrong", 2: "pass", 3: "pass"}, out
    assert "each of its 2 repeats computed other bits than the 3 agreeing devices" in out, out


def test_a_user_step_that_cannot_be_deterministic_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the step runs in torch's strict deterministic mode (repeats are compared bit for bit; under
    warn-only a nondeterministic kernel made healthy H200s `flaky`). An op with no deterministic
    implementation is then the step's problem, said as such (invalid_config), never a chip's verdict.
    Strict mode is forced here on the CPU (put_ without accumulate has no deterministic version there)."""
    from chipcheck.model import train

    monkeypatch.setattr(train, "determinism", lambda device_type: "strict")

    @register_step("put_step", steps=2)
    def build(dev: torch.device, seed: int) -> UserStep:
        w = torch.zeros(8, device=dev)

        def step(i: int) -> torch.Tensor:
            w.put_(torch.tensor([i], device=dev), torch.ones(1, device=dev))
            return w.sum()

        return UserStep(step=step, state=lambda: [w])

    @register_step("add_step", steps=2)
    def build_ok(dev: torch.device, seed: int) -> UserStep:
        w = torch.zeros(8, device=dev)

        def step(i: int) -> torch.Tensor:
            w.add_(torch.arange(8.0, device=dev))
            return w.sum()

        return UserStep(step=step, state=lambda: [w])

    probe = base.get("put_step")
    cfg = probe.config("quick", "cpu", frozenset())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.raises(base.InvalidConfig, match=r"user step 'put_step': .*deterministic.* bit for bit"):
            probe.run_case(_ctx(probe="put_step"), cfg, "step")
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # restored after the step
        out = base.get("add_step").run_case(_ctx(probe="add_step"), cfg, "step")  # a deterministic step: fine
        assert out.verdict is Verdict.PASS and out.params["determinism"] == "strict"
    finally:
        torch.use_deterministic_algorithms(False)
