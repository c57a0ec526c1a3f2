"""The speed retest on the JAX path (probes/jax_retest.py): a JAX device is called `slow` only when its
interleaved GEMM turns against a peer confirm it, as on the torch path; before it, a slow JAX device
was only ever noted ("speed suspect, not retested")."""

from __future__ import annotations

from pathlib import Path

import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from jax_cli import run_jax  # noqa: E402

from chipcheck.fleet import jax_runner  # noqa: E402
from chipcheck.probes import faults, jax_retest  # noqa: E402
from chipcheck.probes import jax_backend as jb  # noqa: E402
from chipcheck.probes.base import InvalidConfig  # noqa: E402
from chipcheck.probes.retest import RetestProbe  # noqa: E402

CFG = RetestProbe.Config(rounds=6, calls=1, gemm_n=128)


@pytest.fixture(scope="module", autouse=True)
def _x64() -> None:
    jb.init()


def _injectors(spec: str, n: int) -> list[jb.Injector]:
    return [jb.Injector.for_rank(faults.parse(spec) if spec else [], r, "retest") for r in range(n)]


def test_the_turns_of_a_suspect_and_its_peer_carry_a_process_wide_slowdown_and_no_one_elses() -> None:
    """Ranks 0-2 on one JAX device: the suspect (1) and its peer (0) take turns; a process-wide `slow`
    on rank 1 stretches its turns alone; rank 2, in no pair, has an outcome without turns."""
    d = jax.devices()[0]
    outs = jax_retest.run_ranks([d, d, d], CFG, "gemm", _injectors("slow:rank=1,factor=3,scope=process", 3),
                                {"retest_gemm": "1:0"})
    assert sorted(outs) == [0, 1, 2]
    t0, t1 = outs[0].params["turn_s"], outs[1].params["turn_s"]
    assert len(t0) == len(t1) == CFG.rounds and "turn_s" not in outs[2].params
    assert "host_busy_share" not in outs[1].params  # one process's devices share its cores: no host-load rule
    assert outs[1].params["kernel"] == "float32 GEMM n=128" and outs[1].params["pairs"] == [[1, 0]]
    ratios = sorted(b / a for a, b in zip(t0, t1, strict=True))
    assert ratios[len(ratios) // 2] > 2.0, ratios  # the stall is 2x the GEMM's own time on every turn
    ext = jax_retest.run_ranks([d, d], CFG, "gemm.bfloat16/extended", _injectors("", 2), {"retest_gemm.bfloat16": "1:0"})
    assert len(ext[1].params["turn_s"]) == CFG.extended_rounds and ext[1].params["kernel"].startswith("bfloat16")


@pytest.mark.parametrize(("case", "options", "words"), [
    ("copy", {"retest_copy": "1:0"}, "only GEMM retests"),
    ("link", {"retest_link": "0>1:1>0"}, "only GEMM retests"),
    ("gemm.int7", {}, "unknown retest case"),
    ("gemm", {"retest_gemm": "5:0"}, "rank 5 is not one of this host's 2 JAX devices"),
])
def test_a_retest_the_jax_path_cannot_run_is_refused(case: str, options: dict[str, str], words: str) -> None:
    d = jax.devices()[0]
    with pytest.raises(InvalidConfig, match=words):
        jax_retest.run_ranks([d, d], CFG, case, _injectors("", 2), options)


def test_a_jax_run_without_probes_named_runs_no_retest_of_its_own() -> None:
    """The retest is the judge's to ask for, with its pairs: never a probe of a default run."""
    assert "retest" in jax_runner.jax_probes() and "retest" not in jax_runner._names([], 4)
    plan = jax_runner.HostPlan(run_id="r", profile="quick", seed=1, probes=["retest"],
                               cases={"retest": ["gemm.float16"]}, options={"retest_gemm.float16": "2:0"})
    assert jax_runner.HostPlan.from_json(plan.to_json()) == plan
    assert jax_runner._cases("quick", "retest", 4, "cpu", plan.cases) == ["gemm.float16"]


def test_a_retest_stage_runs_under_the_whole_run_s_faults_without_refusing_them() -> None:
    """The main stage refuses a fault that can never fire; the retest stage, which runs the retest alone,
    once refused the run's own `--inject 'hang:rank=1,probe=matmul'` ("probe 'matmul' is not in this
    run (it runs retest, retest)"): a run with a speed suspect ended in a usage error (CI, the JAX
    watchdog test, under load)."""
    spec = ["hang:rank=1,probe=matmul"]
    main = jax_runner.HostPlan(run_id="r", profile="quick", seed=0, probes=["matmul"], inject=spec)
    assert jax_runner.never_fires(main, ["matmul"], 4) == ""
    assert "probe 'matmul' is not in this run" in jax_runner.never_fires(main, ["collectives"], 4)
    stage = jax_runner.HostPlan(run_id="r", profile="quick", seed=0, probes=["retest"], inject=spec,
                                cases={"retest": ["gemm.float32"]}, options={"retest_gemm.float32": "1:0"})
    assert jax_runner.never_fires(stage, ["retest"], 4) == ""


@pytest.mark.timing
def test_a_slow_jax_device_is_confirmed_by_a_retest_and_named_alone(tmp_path: Path) -> None:
    rc, data, out = run_jax(tmp_path, 4, "--probes", "matmul", "--min-gap", "0.25",
                            "--inject", "slow:rank=2,factor=3,scope=process", timeout=480)
    assert rc == 1, out[-3000:]
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "pass", 2: "slow", 3: "pass"}
    (retest,) = [p for p in data["devices"][2]["probes"] if p["probe"] == "retest" and p["verdict"] == "slow"]
    assert any("confirmed by retest" in r for r in retest["details"]["reasons"]), retest
    timed = {d["rank"] for d in data["devices"] for p in d["probes"] if p["probe"] == "retest"
             for c in p["details"]["cases"] if c["params"].get("turn_s")}
    # the suspect and a peer took turns; under load the judge may suspect (and clear) others as well
    pairs = {tuple(pr) for c in retest["details"]["cases"] for pr in c["params"]["pairs"]}
    assert any(s == 2 and q != 2 for s, q in pairs), pairs
    assert timed == {r for pr in pairs for r in pr}, (timed, pairs)
