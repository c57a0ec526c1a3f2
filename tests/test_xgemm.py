"""Second-opinion GEMM: library vs independent kernel, and who to blame (chip or library)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cpu_ctx, run_cli, run_json

from chipcheck.fleet.judge.second_opinion import Culprit, Finding, culprit, second_opinion_findings
from chipcheck.probes import xgemm
from chipcheck.results import ProbeResult, Verdict

PROBE = xgemm.SecondOpinionProbe()


def _run(spec: str | None = None, rank: int = 0) -> ProbeResult:
    ctx = cpu_ctx("xgemm", spec, rank=rank)
    out = PROBE.run_case(ctx, PROBE.config("quick", "cpu", frozenset()), "float32")
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp", probe="xgemm",
                       case="float32", verdict=out.verdict, seed=0, params=out.params, metrics=out.metrics,
                       mismatches=out.mismatches, repeats=out.repeats, repeats_bad=out.repeats_bad)


def test_blame_rules() -> None:
    assert culprit({0: False, 1: False}).culprit is Culprit.NONE
    assert culprit({0: False, 1: True, 2: False}) == Finding(Culprit.CHIP, (1,))
    assert culprit({0: True, 1: True, 2: True}) == Finding(Culprit.LIBRARY, (0, 1, 2))
    assert culprit({0: True}).culprit is Culprit.UNKNOWN


def test_clean_chip_agrees() -> None:
    r = _run()
    assert r.verdict is Verdict.PASS and r.metrics["disagree_elements"] == 0
    assert r.params["independent"] == "numpy float64 matmul"


def test_one_bad_chip_is_blamed_and_located() -> None:
    spec = "bitflip:rank=1,bit=21,index=1000"
    results = [_run(spec, rank) for rank in range(3)]
    assert [r.verdict for r in results] == [Verdict.PASS, Verdict.WRONG, Verdict.PASS]
    assert results[1].mismatches[0].first_indices == [[1000 // 256, 1000 % 256]]
    judgements, library = second_opinion_findings(results)
    assert library == [] and [(j.rank, j.verdict) for j in judgements] == [(1, Verdict.WRONG)]


def test_disagreement_everywhere_blames_the_library() -> None:
    results = [_run("bitflip:bit=21,index=5", rank) for rank in range(3)]
    judgements, library = second_opinion_findings(results)
    assert judgements == []
    assert library == [("fp", "float32", Finding(Culprit.LIBRARY, (0, 1, 2)))]


def test_a_library_wrong_everywhere_is_a_finding_not_a_chip_fault(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, "--devices", "cpu:2", "--probes", "xgemm", "--min-gap", "0.9",
                             "--inject", "bitflip:bit=27,probe=xgemm")
    assert rc == 1, out  # the run fails: its users would train on wrong GEMMs
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "pass"}
    assert len(data["findings"]) == 1 and "suspect the library" in data["findings"][0]
    again = run_cli("report", "latest", "--db", str(tmp_path / "results.db"), "--format", "json")
    assert again.returncode == 1 and json.loads(again.stdout)["findings"] == data["findings"]
