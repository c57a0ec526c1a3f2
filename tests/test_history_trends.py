"""History and trends: change points at the right run, no trend from noise, lemons, flaky turns, news."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
from conftest import run_cli
from fleet_history_helpers import store_runs

from chipcheck.fleet import history, synthetic, trends
from chipcheck.fleet.store import Store


def _noisy(n: int, rng: random.Random, level: float = 1.0, sd: float = 0.02) -> list[float]:
    return [rng.gauss(level, sd) for _ in range(n)]


def test_a_drop_is_found_at_the_run_it_began() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        series = _noisy(40, rng) + _noisy(20, rng, level=0.85)
        cp = trends.change_point(series)
        assert cp is not None and cp.index == 40, (seed, cp)
        assert 0.82 < cp.ratio < 0.88


def test_noise_is_never_a_trend() -> None:
    for seed in range(200):
        rng = random.Random(seed)
        assert trends.change_point(_noisy(60, rng, sd=0.03)) is None, seed


def test_one_bad_night_is_not_a_trend_but_three_are() -> None:
    rng = random.Random(3)
    one = _noisy(30, rng) + [0.7] + _noisy(10, rng)
    assert trends.change_point(one) is None
    assert trends.change_point(_noisy(30, rng) + [0.7, 0.7] + _noisy(10, rng)) is None  # two bad nights, recovered
    assert trends.change_point(_noisy(30, rng) + [0.7, 0.71, 0.69]) is not None


def test_missing_runs_are_skipped_and_the_matrix_matches_the_series() -> None:
    rng = random.Random(5)
    series: list[float | None] = [*_noisy(30, rng), *_noisy(15, rng, level=0.8)]
    for i in (3, 17, 31, 40):
        series[i] = None
    cp = trends.change_point(series)
    assert cp is not None and cp.index in (30, 32)  # run 31 is missing: the new level starts at 30 or 32
    m = np.array([[np.nan if v is None else v for v in series]] * 3)
    assert set(trends.drops(m)) == {0, 1, 2}


def _one_row(flaky: list[bool], wrong: list[bool]) -> tuple[bool, int]:
    turned, lemons = trends.flags_matrix(np.array([list(zip(flaky, wrong, strict=True))], dtype=bool))
    return bool(turned[0]), int(lemons[0])


def test_lemon_and_flaky_turn() -> None:
    assert _one_row([False] * 23, [False] * 20 + [True, False, True])[1] == 2
    assert _one_row([False] * 13, [True] + [False] * 12)[1] == 0  # long ago, outside the window
    assert _one_row([False] * 20 + [False, True, False, True, False], [False] * 25)[0]
    assert not _one_row([True, False] * 10 + [False, True, False, True, False], [False] * 25)[0]  # always was flaky
    assert not _one_row([False, True, False, True, False], [False] * 5)[0]  # no past to turn from
    flags = np.zeros((2, 25, 2), dtype=bool)
    flags[0, [21, 23], 0] = True
    flags[1, [22, 24], 1] = True
    turned, lemons = trends.flags_matrix(flags)
    assert turned.tolist() == [True, False] and lemons.tolist() == [0, 2]


def test_stored_history_finds_the_slowing_device_and_reports_news(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    slow = {(5, k): 0.85 for k in range(14, 20)}
    ids = store_runs(db, 16, 20, speed=slow, fail={19: 0.2})
    store = Store(db)
    rep = history.report(store)
    uuid = synthetic.devices(16)[5].uuid
    drops = [f for f in rep.findings if f.code.code == "CC-TRD-001"]
    assert [(f.subject, f.run_id) for f in drops] == [(uuid, ids[14])]
    assert rep.latest == ids[-1] and rep.new_failures  # the failures injected into the last run are new
    assert all(n.before is not None and n.before.value == "pass" for n in rep.new_failures)
    rows = history.device_history(store, uuid)
    assert len(rows) == 20 and rows[0].speed_ratio is not None and rows[-1].speed_ratio < 0.9
    store.close()
    p = run_cli("history", "--db", str(db))
    assert p.returncode == 0 and p.stdout.startswith("New since the last sweep"), p.stderr
    assert "CC-TRD-001" in p.stdout
    p = run_cli("history", uuid, "--db", str(db), "--json")
    assert p.returncode == 0 and len(json.loads(p.stdout)) == 20
    p = run_cli("history", "node0000", "--db", str(db))  # a host: its 8 devices x 20 runs
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1 + 8 * 20
    p = run_cli("history", "no-such-device", "--db", str(db))
    assert p.returncode == 2 and "no device" in p.stderr


def test_a_lemon_is_found_from_stored_runs(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store_runs(db, 10, 12, fail={8: 0.3, 11: 0.3}, seed=4)
    rep = history.report(Store(db))
    lemons = [f for f in rep.findings if f.code.code == "CC-LEM-001"]
    # with seeded failure modes, a device wrong in both of those runs is a lemon (if any is)
    wrong_both = {f.subject for f in lemons}
    for f in lemons:
        assert "wrong in 2 of its last 10 runs" in f.detail
    assert all(u.startswith("GPU-") for u in wrong_both)


def test_a_device_is_followed_on_the_metric_its_probe_is_judged_by() -> None:
    # a burn is judged on its median TFLOP/s: a chip that throttles keeps its early best call, so its
    # history must follow the median (it followed tflops_best, and saw nothing)
    from chipcheck.results import ProbeResult, Verdict

    devs = {r: d for r, d in synthetic.devices(3).items() if r in (1, 2)}  # one fingerprint
    assert devs[1].fingerprint == devs[2].fingerprint

    def burn(rank: int, median: float) -> ProbeResult:
        d = devs[rank]
        return ProbeResult(run_id="r", host=d.host, rank=rank, device=d.label, fingerprint=d.fingerprint,
                           probe="burn", case="bfloat16", verdict=Verdict.PASS, seed=0, params={},
                           metrics={"tflops": median, "tflops_best": 100.0}, mismatches=[], repeats=1,
                           repeats_bad=0, output_hash="", error=None, started=0.0, ended=1.0, device_uuid=d.uuid)

    rows = {r.rank: r for r in history.device_rows("r", 0.0, devs, [burn(1, 100.0), burn(2, 60.0)], {})}
    assert rows[2].speed_ratio is not None and abs(rows[2].speed_ratio - 0.75) < 1e-9
    assert rows[1].speed_ratio is not None and abs(rows[1].speed_ratio - 1.25) < 1e-9
    # a probe the registry does not know is still followed on the first speed metric it carries
    alien = [replace(burn(1, 1.0), probe="vendor_diag", metrics={"gbps_best": 10.0}),
             replace(burn(2, 1.0), probe="vendor_diag", metrics={"gbps_best": 5.0})]
    rows = {r.rank: r for r in history.device_rows("r", 0.0, devs, alien, {})}
    assert rows[2].speed_ratio is not None and abs(rows[2].speed_ratio - 2 / 3) < 1e-9


def test_the_history_holds_a_device_to_its_reports_verdict_not_to_what_it_received(tmp_path: Path) -> None:
    """A bad chip's gradient reaches every rank: each rank's model_dp case is locally `wrong`, and the
    blame rule pins it on the one rank with evidence of its own (its matmul). The history index took each
    device's worst case verdict: `chipcheck history` after a cpu:8 run with one bad chip listed all eight
    devices as newly `wrong`. It also builds again an index a chipcheck before the rule left behind."""
    import sqlite3

    from chipcheck.fleet.judge.verdicts import fleet_verdicts
    from chipcheck.results import Blame, DeviceInfo, DeviceKind, Mismatch, Oracle, ProbeResult, Verdict

    devs = {r: DeviceInfo(index=r, kind=DeviceKind.CPU, name="cpu", memory_bytes=0, uuid=f"u{r}", host="h",
                          fingerprint="fp") for r in range(4)}
    shared = Mismatch(oracle=Oracle.REFERENCE, tensor="loss", bad_elements=1, total_elements=8, blame=Blame.SHARED,
                      group=[0, 1, 2, 3], note="global loss (all ranks see it)")
    own = Mismatch(oracle=Oracle.EXACT, tensor="C", bad_elements=1, total_elements=64, first_indices=[[0, 1]],
                   bit_histogram={20: 1})

    def res(rank: int, probe: str, case: str, bad: bool, m: Mismatch) -> ProbeResult:
        return ProbeResult(run_id="r1", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp", probe=probe,
                           case=case, verdict=Verdict.WRONG if bad else Verdict.PASS, seed=0,
                           mismatches=[m] if bad else [], repeats=1, repeats_bad=int(bad), device_uuid=f"u{rank}")

    results = [res(r, "model_dp", "tp2/fp32", True, shared) for r in range(4)]
    results += [res(r, "matmul", "float32/exact", r == 3, own) for r in range(4)]
    db = tmp_path / "h.db"
    store = Store(db)
    store.begin_run("r1", host="h", profile="quick", seed=0, argv=[], config={}, started=1.79e9)
    store.add_devices("r1", devs.items())
    for r in results:
        store.add_result(r)
    store.add_judgements("r1", fleet_verdicts(devs, results, min_gap=0.1).judgements)
    store.end_run("r1", Verdict.WRONG)
    assert history.index(store) == 1
    assert {d.rank: d.verdict for d in store.device_runs()} == {0: Verdict.PASS, 1: Verdict.PASS, 2: Verdict.PASS,
                                                                 3: Verdict.WRONG}
    news = history.report(store).new_failures
    assert [(f.uuid, f.verdict) for f in news] == [("u3", Verdict.WRONG)], news
    store.close()
    # an index the old rule built: every rank wrong, no rule recorded
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE device_runs SET verdict='wrong', wrong=1")
        conn.execute("DELETE FROM derived")
    for readonly in (True, False):
        store = Store(db, readonly=readonly)
        history.index(store)
        assert [d.rank for d in store.device_runs() if d.verdict is Verdict.WRONG] == [3], readonly
        store.close()
