"""A fault no kernel of the run matched is said, not passed over: a run that passes with it proves
nothing about that fault (fleet.judge.injected, counted per case by fleet.harness)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

from conftest import run_cli, run_json

from chipcheck.fleet.judge import injected
from chipcheck.results import ProbeResult, Verdict

EXP = "bitflip:rank=1,bit=22,op=exp,scope=process"
FP16 = "bitflip:rank=1,bit=3,dtype=float16,scope=process"


def _res(rank: int, case: str, hits: dict[str, int] | None) -> ProbeResult:
    settings = {"inject": list(hits or {}), **({"inject_hits": hits} if hits is not None else {})}
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="f", probe="matmul",
                       case=case, verdict=Verdict.PASS, seed=0, params={}, settings=settings)


def test_a_fault_that_hit_no_call_is_a_finding_and_one_that_hit_is_not() -> None:
    results = [_res(0, "a", None), _res(1, "a", {EXP: 0, FP16: 0}), _res(1, "b", {EXP: 0, FP16: 4})]
    found = injected.unfired(results)
    assert len(found) == 1 and EXP in found[0] and "rank 1" in found[0] and "op exp" in found[0], found
    # a hang or crash that fires ends the process before its count: the watchdog's error says it
    assert injected.unfired([_res(1, "a", {"hang:rank=1,op=exp": 0})]) == []
    # results that did not count (an error a supervisor filled in, an older store) say nothing
    assert injected.unfired([dataclasses.replace(_res(1, "a", None), settings={"inject": [EXP]})]) == []
    waits = injected.unfired([_res(1, "a", {"bitflip:rank=1,bit=3,after=500,dtype=float16": 0})])[0]
    assert "a GEMM, attention or convolution kernel" in waits and "after 500" in waits and "float16" in waits


def test_a_run_says_which_injected_fault_hit_nothing(tmp_path: Path) -> None:
    code, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "matmul", "--inject", EXP,
                               "--inject", FP16)
    assert code == 1, out  # the float16 flip is caught on rank 1 ...
    assert [d["verdict"] for d in sorted(data["devices"], key=lambda d: d["rank"])] == ["pass", "wrong"]
    # ... and the exp flip, which no matmul kernel runs, is said to have hit nothing
    assert len(data["findings"]) == 1 and EXP in data["findings"][0], data.get("findings")
    with sqlite3.connect(tmp_path / "results.db") as c:
        rows = [(rank, case, json.loads(body)["settings"]) for rank, case, body in
                c.execute("SELECT rank, case_name, body FROM results WHERE probe = 'matmul'")]
    assert all("inject_hits" not in s for rank, _, s in rows if rank == 0)
    for _, case, s in (r for r in rows if r[0] == 1):
        assert s["inject_hits"][EXP] == 0
        assert (s["inject_hits"][FP16] > 0) == case.startswith("float16"), (case, s)
    report = run_cli("report", "--db", str(tmp_path / "results.db"))  # a reloaded run says it too
    assert f"--inject '{EXP}' hit no kernel call" in report.stdout, report.stdout
