"""Speed verdicts end to end: a clean run is never slow, a slow chip is slow only after its retest,
a uniformly slow group is caught by the SKU baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import device, run_cli, run_json

from chipcheck.fleet import devices


def _verdicts(data: dict) -> dict[int, str]:
    return {d["rank"]: d["verdict"] for d in data["devices"]}


def _unreachable_table(tmp_path: Path) -> Path:
    """A --baselines file with an entry for this machine's CPU that it cannot reach (100 TFLOP/s fp32)."""
    sku = devices.discover("cpu:1")[0].name
    table = tmp_path / "baselines.toml"
    table.write_text(f'[sku.this-cpu]\nlabel = "this CPU"\nkind = "cpu"\nmatch = ["{sku}"]\n'
                     'source = "test: a figure no CPU reaches"\ngemm_min_n = 0\n'
                     '[sku.this-cpu.gemm_tflops]\nfloat32 = { peak = 200.0, achievable = 0.5 }\n')
    return table


def test_a_uniformly_slow_group_is_caught_by_the_baseline(tmp_path: Path) -> None:
    # Peers cannot see a whole group slow together; a baseline can. This machine's CPU gets a table
    # entry it cannot reach (100 TFLOP/s fp32), so every device is far below it.
    table = _unreachable_table(tmp_path)
    rc, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "matmul", "--baselines", str(table))
    assert rc == 1, out
    assert _verdicts(data) == {0: "slow", 1: "slow"}
    reasons = " ".join(device(data, 0)["probes"][0]["details"]["reasons"])
    assert "of the this CPU float32 baseline" in reasons and "all 2 devices of its fingerprint" in reasons


def test_a_run_judged_again_later_reads_its_own_baselines_file(tmp_path: Path) -> None:
    # a run cut short is judged when it is reported: with the --baselines file it ran with, not the
    # shipped table; when that file is gone, the report says so
    import sqlite3

    table = _unreachable_table(tmp_path)
    # --min-gap 0.9: the baseline file is this test's matter, not the peers. Under the parallel suite's
    # load a peer retest once confirmed core 1 at 0.81x (0.75-0.88) of core 0 while another test's work
    # shared core 1 (CI, 2026-12-04): CPU-time accounting cannot see such a tenant (see the note)
    rc, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "matmul", "--baselines", str(table),
                             "--min-gap", "0.9")
    assert rc == 1 and _verdicts(data) == {0: "slow", 1: "slow"}, out
    db = tmp_path / "results.db"
    with sqlite3.connect(db) as conn:  # as if the run had been killed before it was judged
        conn.execute("DELETE FROM judgements")
        conn.execute("UPDATE runs SET status='interrupted', verdict=NULL, ended=NULL")
    again = tmp_path / "again.json"
    p = run_cli("report", "--db", str(db), "--format", "json", "-o", str(again))
    assert p.returncode in (0, 1), p.stderr
    assert _verdicts(json.loads(again.read_text())) == {0: "slow", 1: "slow"}
    table.unlink()
    p = run_cli("report", "--db", str(db), "--format", "json", "-o", str(again))
    doc = json.loads(again.read_text())
    assert _verdicts(doc) == {0: "pass", 1: "pass"}
    assert any("--baselines file cannot be read now" in f for f in doc["findings"]), doc["findings"]


@pytest.mark.timing
def test_a_process_wide_slow_chip_is_slow_after_its_retest_and_nobody_else(tmp_path: Path) -> None:
    # 30% slower: at 20% one CI run (2026-12-01) saw the retest clear it (0.97x, 95% interval
    # 0.89-1.04, a miss, not a false flag); the sensitivity below 30% is benchmarks/bench_speed.py's
    rc, data, out = run_json(tmp_path, "--devices", "cpu:4", "--probes", "matmul,model_step",
                             "--inject", "slow:rank=2,factor=1.3,scope=process")
    assert rc == 1, out
    assert _verdicts(data) == {0: "pass", 1: "pass", 2: "slow", 3: "pass"}
    retest = next(p for p in device(data, 2)["probes"] if p["probe"] == "retest")
    (hi,) = [v for k, v in retest["metrics"].items() if k.startswith("gemm") and k.endswith(":ratio_hi")]
    assert retest["verdict"] == "slow" and hi < 0.95


@pytest.mark.timing
def test_a_chip_that_throttles_mid_burn_is_slow_after_its_retest_and_a_clean_burn_is_not(tmp_path: Path) -> None:
    # rank 1 runs at half speed from 6 s into the run on, for the rest of the run: its retest too, as
    # a power-capped chip would. Its burn is usually under way by then (a step down in its timeline);
    # on a busy host it may start late and run slow nearly throughout (its median speed shows it), and
    # rank 0's burn then steps down when rank 1 starts beside it: both are suspects, and the one
    # retest of the pair settles both (CI 2026-12-02 passed this run before fleet.judge.speed paired them)
    rc, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "burn", "--duration", "8",
                             "--inject", "slow:rank=1,factor=2,after_s=6,scope=process")
    assert rc == 1, out
    assert _verdicts(data) == {0: "pass", 1: "slow"}
    reasons = " ".join(r for p in device(data, 1)["probes"] for r in p["details"].get("reasons", []))
    assert "confirmed by retest" in reasons, reasons
    (tmp_path / "clean").mkdir()
    rc, data, out = run_json(tmp_path / "clean", "--devices", "cpu:2", "--probes", "burn")
    assert rc == 0 and _verdicts(data) == {0: "pass", 1: "pass"}, out


def test_the_retest_second_stage_runs_its_extended_rounds_on_real_workers() -> None:
    # the second stage of an inconclusive retest (fleet.judge.speed): the same pair, more rounds,
    # recorded as its own case so the judge can pool both stages
    from chipcheck.fleet.judge import speed
    from chipcheck.fleet.launch import LaunchRequest, run_local

    options = {"retest_gemm": "1:0", "retest_stage": speed.EXTENDED}
    got: list = []
    req = LaunchRequest(run_id="t-extended", devices=devices.discover("cpu:2"), profile="quick", seed=0,
                        probes=[(speed.RETEST, speed.retest_cases(options))], timeout_s=300, options=options)
    run_local(req, got.append)
    assert {(r.rank, r.case) for r in got} == {(0, "gemm/extended"), (1, "gemm/extended")}
    for r in got:
        assert r.error is None, r.error
        assert r.params["rounds"] == 36 and len(r.params["turn_s"]) == 36


@pytest.mark.timing
def test_a_chip_slow_in_bf16_only_is_retested_in_bf16_and_slow_and_nobody_else(tmp_path: Path) -> None:
    # its fp32 and fp16 GEMMs run at full speed: a float32 retest cleared it (2026-12-04, 1.6x slower
    # bf16: "speed suspect cleared by retest: 1.05x its peer"). 3x: this host's 8-19% noise between
    # cases hides 1.6x from the dtype rule in some runs (benchmarks/bench_speed.py's sensitivity)
    rc, data, out = run_json(tmp_path, "--devices", "cpu:4", "--probes", "matmul",
                             "--inject", "slow:rank=2,factor=3,dtype=bfloat16,scope=process")
    assert rc == 1, out
    assert _verdicts(data) == {0: "pass", 1: "pass", 2: "slow", 3: "pass"}
    retest = next(p for p in device(data, 2)["probes"] if p["probe"] == "retest")
    assert retest["verdict"] == "slow" and retest["metrics"]["gemm.bfloat16:ratio_hi"] < 0.95, retest


@pytest.mark.timing
def test_a_slow_cable_is_that_link_confirmed_by_its_retest_and_no_device(tmp_path: Path) -> None:
    # rank 1's sends to rank 2 only, 10x as long (the lag is charged at rank 1's next op). Before the
    # lag was charged on a send's work rather than its issue, no link was slow at all; how often 5x
    # is named is benchmarks/bench_speed.py's (links --fault link)
    rc, data, out = run_json(tmp_path, "--devices", "cpu:4", "--probes", "links",
                             "--inject", "slow:rank=1,op=send,peer=2,factor=10,scope=process")
    assert rc == 1, out
    flagged = {(x["src"], x["dst"]): x for x in data["links"] if x["verdict"] != "pass"}
    assert flagged[(1, 2)]["verdict"] == "slow" and "confirmed by retest" in flagged[(1, 2)]["reason"], flagged
    assert all(1 in link for link in flagged), flagged  # an ack from 1 to 2 is one of its sends too
    assert {r for r, v in _verdicts(data).items() if v != "pass"} <= {1}, _verdicts(data)


@pytest.mark.timing
def test_a_chip_slow_in_attention_alone_is_confirmed_on_attention_and_nobody_else(tmp_path: Path) -> None:
    # its GEMMs run at full speed: before attention had a retest kernel of its own, the GEMM retest
    # cleared it (2026-12-05: "speed suspect cleared by retest: 1.02x its peer ... attention 0.75x")
    rc, data, out = run_json(tmp_path, "--devices", "cpu:4", "--probes", "matmul,attention",
                             "--inject", "slow:rank=2,op=_scaled_dot_product_flash_attention_for_cpu,factor=2,"
                                         "scope=process")
    assert rc == 1, out
    assert _verdicts(data) == {0: "pass", 1: "pass", 2: "slow", 3: "pass"}
    retest = next(p for p in device(data, 2)["probes"] if p["probe"] == "retest")
    assert retest["verdict"] == "slow" and retest["metrics"]["attention:ratio_hi"] < 0.95, retest
