"""The calm terminal: per-device progress lines, the compact summary, and the streamed case lines."""

from __future__ import annotations

from dataclasses import replace

from chipcheck.fleet import synthetic
from chipcheck.reports import terminal
from chipcheck.reports.progress import Progress, case_line
from chipcheck.results import Blame, Mismatch, Oracle, ProbeResult, Verdict


def _result(rank: int, case: str, verdict: Verdict) -> ProbeResult:
    return ProbeResult(run_id="r", host="node1", rank=rank, device=f"cuda:{rank}", fingerprint="fp", probe="matmul",
                       case=case, verdict=verdict, seed=0, metrics={"tflops": 512.25})


def test_one_line_per_device_with_done_total_current_elapsed_and_failures() -> None:
    p = Progress(started=100.0)
    for rank in (0, 1):
        p.device(rank, f"node1 cuda:{rank}").total = 3
    p.start(0, "matmul", "bfloat16/random")
    p.result(_result(1, "float32/exact", Verdict.WRONG))
    p.start(1, "matmul", "bfloat16/random")
    lines = p.lines(now=100.0 + 3725, width=200)
    assert len(lines) == 2
    assert lines[0].startswith("rank 0   node1 cuda:0") and "0/3" in lines[0] and "1:02:05" in lines[0]
    assert lines[0].endswith("matmul bfloat16/random") and "0 failing" in lines[0]
    assert "1/3" in lines[1] and "1 failing" in lines[1]
    for case in ("bfloat16/random", "float16/random"):
        p.result(_result(1, case, Verdict.PASS))
    assert p.lines(now=200.0)[1].endswith("done")
    assert all(len(x) <= 40 for x in p.lines(now=200.0, width=40))  # a redraw never wraps


def test_unknown_plan_fills_in_from_results() -> None:
    p = Progress(started=0.0)
    p.result(_result(2, "float32/exact", Verdict.PASS))
    (line,) = p.lines(now=1.0)
    assert "node1 cuda:2" in line and "1/?" in line


def test_case_lines_stay_greppable() -> None:
    assert case_line(7, _result(3, "float32/exact", Verdict.WRONG)) == \
        "[   7] rank 3 cuda:3 matmul float32/exact          wrong  512.250 TFLOP/s"


def test_a_value_the_whole_group_holds_is_not_counted_against_each_rank_live() -> None:
    # a bad chip's gradient reaches every rank of a data-parallel step: every rank's case is locally
    # wrong on the shared loss. Live, each rank read "1 failing" and its case line a plain `wrong`.
    shared = Mismatch(oracle=Oracle.REFERENCE, tensor="loss", bad_elements=1, total_elements=8,
                      blame=Blame.SHARED, group=[0, 1], note="global loss (all ranks see it)")
    r = replace(_result(0, "dp/fp32", Verdict.WRONG), probe="model_dp", mismatches=[shared])
    p = Progress(started=0.0)
    p.result(r)
    assert "0 failing" in p.lines(now=1.0)[0]
    assert " wrong (group) " in case_line(1, r)


def test_compact_summary_shows_every_device_once_and_only_failing_findings() -> None:
    s = synthetic.run(10, fail_fraction=0.5)
    text = terminal.render_compact(s)
    for d in s.devices:
        assert sum(1 for line in text.splitlines() if line.endswith(d.uuid)) == 1
    failing = [d for d in s.devices if d.verdict is not Verdict.PASS]
    assert text.count("=> ") == len(failing)
    assert "CC-SDC-001 (critical, replace_chip)" in text
    assert "repeats 0/4 bad" not in text  # passing cases are not listed
    assert text.splitlines()[-1] == terminal.render(s).splitlines()[-1]  # the same verdict line
