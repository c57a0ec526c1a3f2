"""Absolute baselines per SKU and a device's own history: slow that peers cannot see."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chipcheck.fleet.judge import baselines as bl
from chipcheck.fleet.judge.baselines import BaselineError, SpeedKey, baseline_judgements
from chipcheck.fleet.judge.own_history import history_judgements, run_speeds, speed_history
from chipcheck.fleet.store import Store
from chipcheck.probes import matmul
from chipcheck.results import DeviceInfo, DeviceKind, ErrorInfo, ErrorKind, ProbeResult, Verdict

TEST_CPU = "chipcheck-test-cpu"  # matched by the shipped [sku.cpu-test] entry: float32 2.0 peak x 0.5 achievable


def _dev(rank: int, name: str = TEST_CPU, fp: str = "fp1", host: str = "h", kind: DeviceKind = DeviceKind.CPU,
         mem: int = 0) -> DeviceInfo:
    return DeviceInfo(index=rank, kind=kind, name=name, memory_bytes=mem, uuid=f"u{rank}", host=host,
                      fingerprint=fp, fingerprint_fields={"sku": name})


def _mm(rank: int, tf: float, case: str = "float32/random", n: int = 512, fp: str = "fp1",
        run: str = "r", started: float = 0.0) -> ProbeResult:
    return ProbeResult(run_id=run, host="h", rank=rank, device=f"cpu:{rank}", fingerprint=fp, probe="matmul",
                       case=case, verdict=Verdict.PASS, seed=0, params={"m": n, "n": n, "k": n},
                       metrics={"tflops_best": tf}, device_uuid=f"u{rank}", started=started)


def _shipped() -> bl.BaselineTable:
    return bl.load()


# ---- the table ----------------------------------------------------------------------------------------

def test_shipped_table_loads_validates_and_names_sources() -> None:
    t = _shipped()
    keys = {b.key for b in t.entries}
    assert {"h100-sxm", "h100-pcie", "h200-sxm", "b200", "a100-sxm-80gb", "a100-pcie-80gb", "mi300x", "l40s",
            "tpu-v5e", "tpu-v5p", "cpu-test"} <= keys
    for b in t.entries:
        assert b.source and b.label and b.match
        assert all(0 < f.achievable <= 1 and f.peak > 0 for f in b.gemm_tflops.values())
    assert set(bl.GEMM_DTYPES) == set(matmul.ALL_DTYPES)  # the table's dtypes are the probe's
    h100 = t.get("h100-sxm")
    assert h100 is not None and h100.gemm_tflops["bfloat16"].peak == 989.4


@pytest.mark.parametrize(("name", "mem_gb", "key"), [
    ("NVIDIA H100 80GB HBM3", 85, "h100-sxm"),
    ("NVIDIA H100 PCIe", 85, "h100-pcie"),
    ("NVIDIA H100 NVL", 100, None),         # another part, other peaks
    ("NVIDIA H200", 150, "h200-sxm"),
    ("NVIDIA GH200 480GB", 102, None),      # contains "H200"
    ("NVIDIA B200", 192, "b200"),
    ("NVIDIA A100-SXM4-80GB", 85, "a100-sxm-80gb"),
    ("NVIDIA A100-SXM4-40GB", 42, "a100-sxm-40gb"),
    ("NVIDIA A100 80GB PCIe", 85, "a100-pcie-80gb"),
    ("AMD Instinct MI300X", 206, "mi300x"),
    ("NVIDIA H100 80GB HBM3", 10, None),    # a MIG slice: a fraction of the chip
])
def test_cuda_device_names_match_their_sku(name: str, mem_gb: int, key: str | None) -> None:
    b = _shipped().match(_dev(0, name=name, kind=DeviceKind.CUDA, mem=mem_gb * 10**9))
    assert (b.key if b else None) == key


def test_tpu_device_kinds_match() -> None:
    t = _shipped()
    assert t.match(_dev(0, name="TPU v5 lite", kind=DeviceKind.TPU)).key == "tpu-v5e"  # type: ignore[union-attr]
    assert t.match(_dev(0, name="TPU v5", kind=DeviceKind.TPU)).key == "tpu-v5p"  # type: ignore[union-attr]
    assert t.match(_dev(0, name="TPU v5 lite", kind=DeviceKind.CUDA)) is None


def test_a_real_cpu_matches_nothing() -> None:
    assert _shipped().match(_dev(0, name="AMD EPYC 9654 96-Core Processor")) is None


@pytest.mark.parametrize(("text", "message"), [
    ("[sku.x\nlabel = 1", "not valid TOML"),
    ("schema = 2\n[sku.x]\nlabel='X'", "schema 2 is not supported"),
    ("[sku.x]\nlabel = 'X'\nkind = 'cuda'\nmatch = ['X']", "lacks `source`"),
    ("[sku.x]\nlabel='X'\nkind='gpu'\nmatch=['X']\nsource='s'\nmemory_gbps={peak=1.0, achievable=0.5}",
     "kind 'gpu' is not one of"),
    ("[sku.x]\nlabel='X'\nkind='cuda'\nmatch=['X']\nsource='s'\nmemory_gbps={peak=1.0, achievable=1.5}",
     "achievable is a fraction of peak"),
    ("[sku.x]\nlabel='X'\nkind='cuda'\nmatch=['X']\nsource='s'\n[sku.x.gemm_tflops]\nbf16={peak=1.0, achievable=0.5}",
     "gemm_tflops.bf16 is not a matmul dtype"),
    ("[sku.x]\nlabel='X'\nkind='cuda'\nmatch=['X']\nsource='s'\nmemroy_gbps={peak=1.0, achievable=0.5}",
     "unknown key 'memroy_gbps'"),
    ("[sku.x]\nlabel='X'\nkind='cuda'\nmatch=['X']\nsource='s'", "has no figures"),
    ("[sku.x]\nlabel='X'\nkind='cuda'\nmatch=['H200']\nsource='s'\nmemory_gbps={peak=1.0, achievable=0.5}",
     "both match 'H200'"),
])
def test_a_malformed_user_file_raises_one_line(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "mine.toml"
    p.write_text(text)
    with pytest.raises(BaselineError) as e:
        bl.load(p)
    msg = str(e.value)
    assert message in msg and "\n" not in msg and str(p) in msg
    assert isinstance(e.value, ValueError)


def test_a_missing_user_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match="not found"):
        bl.load(tmp_path / "absent.toml")


def test_an_override_file_replaces_an_entry_and_adds_one(tmp_path: Path) -> None:
    p = tmp_path / "mine.toml"
    p.write_text("""
[sku.h100-sxm]
label = "H100 SXM (our power cap)"
kind = "cuda"
match = ["H100 80GB HBM3"]
source = "our acceptance runs, 2026-10"
gemm_min_n = 4096
[sku.h100-sxm.gemm_tflops]
bfloat16 = { peak = 989.4, achievable = 0.6 }

[sku.rtx-6000-ada]
label = "RTX 6000 Ada"
kind = "cuda"
match = ["RTX 6000 Ada"]
source = "vendor sheet"
memory_gbps = { peak = 960.0, achievable = 0.8 }
""")
    t = bl.load(p)
    h100 = t.get("h100-sxm")
    assert h100 is not None and h100.label == "H100 SXM (our power cap)" and h100.memory_gbps is None
    assert set(h100.gemm_tflops) == {"bfloat16"} and h100.gemm_tflops["bfloat16"].achievable == 0.6
    assert [b.key for b in t.entries].count("h100-sxm") == 1
    assert t.match(_dev(0, name="NVIDIA RTX 6000 Ada Generation", kind=DeviceKind.CUDA)).key == "rtx-6000-ada"  # type: ignore[union-attr]
    assert t.get("a100-sxm-80gb") is not None  # the rest of the shipped table stays


# ---- baseline judgements ------------------------------------------------------------------------------

def test_sixty_percent_of_baseline_is_slow_ninety_five_is_not() -> None:
    # cpu-test float32: achievable 1.0 TFLOP/s = 0.5 x 2.0 peak
    devs = {0: _dev(0, fp="a"), 1: _dev(1, fp="b")}
    js = baseline_judgements([_mm(0, 0.60, fp="a"), _mm(1, 0.95, fp="b")], devs, _shipped())
    assert [(j.rank, j.verdict, j.probe, j.case) for j in js] == [(0, Verdict.SLOW, "matmul", "float32/random")]
    (j,) = js
    assert j.reason.startswith("60% of the chipcheck test CPU float32 baseline")
    assert "achievable 1 TFLOP/s = 0.50 x 2 peak" in j.reason and "source: synthetic" in j.reason
    assert j.metrics["ratio_to_baseline"] == pytest.approx(0.6)
    assert j.metrics["baseline_tflops"] == 1.0 and j.metrics["peak_tflops"] == 2.0


def test_the_best_case_per_dtype_counts() -> None:
    # one noisy case at 0.5 and one clean one at 0.97: noise only lowers speed, so the device passes
    devs = {0: _dev(0)}
    rs = [_mm(0, 0.5, case="float32/random"), _mm(0, 0.97, case="float32/exact")]
    assert baseline_judgements(rs, devs, _shipped()) == []
    # dtypes are separate keys: a slow bfloat16 (achievable 2.0) is flagged on its own
    (j,) = baseline_judgements([*rs, _mm(0, 1.0, case="bfloat16/exact")], devs, _shipped())
    assert j.case == "bfloat16/exact" and "50% of the chipcheck test CPU bfloat16" in j.reason


def test_a_uniformly_slow_fingerprint_group_is_caught() -> None:
    # every device equally slow: peers see nothing (ratio 1.0 to their median); the baseline sees all four
    from chipcheck.fleet.judge import speed
    from chipcheck.fleet.judge.verdicts import speed_tables

    devs = {r: _dev(r) for r in range(4)}
    rs = [_mm(r, 0.62) for r in range(4)]
    assert speed.suspects(rs, speed.SpeedPolicy(), *speed_tables()) == []
    js = baseline_judgements(rs, devs, _shipped())
    assert [j.rank for j in js] == [0, 1, 2, 3] and all(j.verdict is Verdict.SLOW for j in js)
    assert all("all 4 devices of its fingerprint are below it" in j.reason for j in js)


def test_devices_without_an_entry_or_below_the_size_gate_are_not_judged() -> None:
    t = _shipped()
    cpu = {0: _dev(0, name="Intel(R) Xeon(R) Platinum 8480+")}
    assert baseline_judgements([_mm(0, 0.001)], cpu, t) == []
    # an H100 at the CPU-sized quick shapes (512^3) is below gemm_min_n 4096: no verdict from it
    h100 = {0: _dev(0, name="NVIDIA H100 80GB HBM3", kind=DeviceKind.CUDA, mem=85 * 10**9)}
    assert baseline_judgements([_mm(0, 5.0, case="bfloat16/random", n=512)], h100, t) == []
    (j,) = baseline_judgements([_mm(0, 200.0, case="bfloat16/random", n=4096)], h100, t)
    assert "of the H100 SXM bfloat16 baseline" in j.reason and "source: NVIDIA H100" in j.reason
    # the measured healthy H100 at 4096^3 (docs/benchmarks.md) passes every dtype it has a figure for
    healthy = [_mm(0, tf, case=f"{d}/random", n=4096) for d, tf in
               (("float32", 47.0), ("tf32", 322.0), ("bfloat16", 546.0), ("float16", 453.0), ("float8_e4m3fn", 315.0))]
    assert baseline_judgements(healthy, h100, t) == []


def test_errored_results_are_not_speed_evidence() -> None:
    r = _mm(0, 0.1)
    bad = ProbeResult(**{**{f: getattr(r, f) for f in r.__dataclass_fields__},
                         "verdict": Verdict.ERROR, "error": ErrorInfo(kind=ErrorKind.TIMEOUT, message="hung")})
    assert baseline_judgements([bad], {0: _dev(0)}, _shipped()) == []


def _bw(rank: int, gbps: float, case: str = "copy") -> ProbeResult:
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp1", probe="bandwidth",
                       case=case, verdict=Verdict.PASS, seed=0, metrics={"gbps_best": gbps})


def _coll(rank: int, busbw: float, case: str = "all_reduce_sum/float32") -> ProbeResult:
    return ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp1",
                       probe="collectives", case=case, verdict=Verdict.PASS, seed=0,
                       params={"sizes": [8, 1024, 262144]}, metrics={"busbw_gbps_best": busbw})


def test_memory_copy_and_collective_busbw_have_baselines() -> None:
    devs = {0: _dev(0), 1: _dev(1)}
    # copy achievable 10 GB/s, busbw achievable 2 GB/s (cpu-test); `read` and broadcast are not compared
    rs = [_bw(0, 6.0), _bw(1, 9.8), _bw(1, 1.0, case="read"), _coll(0, 1.9), _coll(1, 1.0),
          _coll(1, 0.1, case="broadcast/float32")]
    js = baseline_judgements(rs, devs, _shipped())
    assert [(j.rank, j.probe) for j in js] == [(0, "bandwidth"), (1, "collectives")]
    assert "60% of the chipcheck test CPU memory copy baseline" in js[0].reason
    assert "50% of the chipcheck test CPU collective busbw baseline" in js[1].reason
    # across hosts the network limits collectives: no link baseline then
    two_hosts = {0: _dev(0, host="a"), 1: _dev(1, host="b")}
    assert [j.probe for j in baseline_judgements(rs, two_hosts, _shipped())] == ["bandwidth"]


# ---- own history --------------------------------------------------------------------------------------

def test_twenty_eight_percent_below_its_own_median_is_slow() -> None:
    past = [100.0, 101.0, 99.0, 100.5, 99.5, 100.0, 98.5]
    (j,) = history_judgements({0: 72.0, 1: 99.0}, {0: past, 1: past}, probe="matmul", case="bfloat16",
                              unit="TFLOP/s")
    assert j.rank == 0 and j.verdict is Verdict.SLOW and j.probe == "matmul"
    assert j.reason.startswith("28% below its own 30-day median: 72 TFLOP/s now against 100 TFLOP/s over 7 runs")
    assert j.metrics["ratio_to_own_median"] == pytest.approx(0.72)


def test_a_noisy_but_clean_history_is_not_slow() -> None:
    rng = random.Random(5)
    for _ in range(200):
        past = [rng.gauss(100.0, 4.0) for _ in range(20)]
        assert history_judgements({0: rng.gauss(100.0, 4.0)}, {0: past}) == []
    # a device whose own figures swing by +-15% is not called slow for a 22% dip (within its noise)
    wild = [100.0, 70.0, 130.0, 85.0, 115.0, 75.0, 125.0, 100.0]
    assert history_judgements({0: 78.0}, {0: wild}) == []


def test_too_short_a_history_is_not_judged() -> None:
    assert history_judgements({0: 10.0}, {0: [100.0] * 4}) == []
    assert len(history_judgements({0: 10.0}, {0: [100.0] * 5})) == 1
    assert history_judgements({0: 10.0}, {}) == []


def _retested(peer_turn: float, mine: float, dtype: str = "float32") -> list[ProbeResult]:
    """A run whose rank 1 GEMMs ran 0.75x its peers', and a retest of it against a peer (case `gemm`,
    in `dtype`) whose turns took `mine` against the peer's `peer_turn` (the judge picks the peer)."""
    out = [_mm(r, 0.75 if r == 1 else 1.0, case) for r in range(4) for case in ("float32/exact", "float32/random")]
    for rank, t in ((0, peer_turn), (1, mine), (2, peer_turn), (3, peer_turn)):
        out.append(ProbeResult(run_id="r", host="h", rank=rank, device=f"cpu:{rank}", fingerprint="fp1",
                               probe="retest", case="gemm", verdict=Verdict.PASS, seed=0,
                               params={"turn_s": [t * (1 + 0.01 * (i % 3)) for i in range(12)], "dtype": dtype}))
    return out


@pytest.mark.parametrize(("mine", "dtype", "drop", "called"), [
    (0.030, "float32", "float32", Verdict.PASS),  # the retest cleared it in that dtype: a dip, noted
    (0.040, "float32", "float32", Verdict.SLOW),  # confirmed by the retest: slow either way
    (0.030, "float32", "bfloat16", Verdict.SLOW),  # cleared in another dtype: the bf16 drop stands
])
def test_a_drop_against_its_own_past_that_the_retest_cleared_is_only_noted(mine: float, dtype: str, drop: str,
                                                                           called: Verdict) -> None:
    from chipcheck.fleet.judge.verdicts import fleet_verdicts

    own = history_judgements({1: 0.75}, {1: [1.0, 1.01, 0.99, 1.0, 1.0, 1.02]}, probe="matmul", case=drop,
                             unit="TFLOP/s")
    v = fleet_verdicts({r: _dev(r, name="no baseline") for r in range(4)}, _retested(0.030, mine, dtype), min_gap=0.1,
                       own=own)
    (j,) = [j for j in v.judgements if j.rank == 1 and j.probe == "matmul"]
    assert j.verdict is called and j.reason.count("25% below its own 30-day median") == 1, j.reason
    if called is Verdict.PASS:
        assert j.reason.startswith("not called slow") and "cleared by retest: 1.00x its peer" in j.reason
    assert {x.rank for x in v.judgements if x.verdict is not Verdict.PASS} <= {1}


def test_speed_history_reads_absolute_figures_from_the_store(tmp_path: Path) -> None:
    s = Store(tmp_path / "r.db")
    day = 86400.0
    key = SpeedKey(probe="matmul", family="float32", metric="tflops_best", unit="TFLOP/s")
    for i, tf in enumerate([1.0, 1.1, 0.9, 1.0, 1.05]):
        run = f"run{i}"
        s.begin_run(run, host="h", profile="quick", seed=0, argv=[], config={}, started=i * day)
        s.add_result(_mm(0, tf, run=run, started=i * day))
        s.add_result(_mm(0, tf / 2, case="float32/exact", run=run, started=i * day))  # the best case counts
        s.add_result(_mm(0, 9.0, case="bfloat16/random", run=run, started=i * day))  # another key
    s.begin_run("old", host="h", profile="quick", seed=0, argv=[], config={}, started=-60 * day)
    s.add_result(_mm(0, 50.0, run="old", started=-60 * day))  # outside the 30 days
    s.begin_run("now", host="h", profile="quick", seed=0, argv=[], config={}, started=5 * day)
    current = [_mm(0, 0.7, run="now", started=5 * day), _mm(1, 1.0, run="now", started=5 * day)]
    for r in current:
        s.add_result(r)
    past = speed_history(s, "u0", key, now=5 * day, exclude_run="now")
    assert past == [1.0, 1.1, 0.9, 1.0, 1.05]
    now = run_speeds(current, key)
    assert {r: x.value for r, x in now.items()} == {0: 0.7, 1: 1.0}
    (j,) = history_judgements({0: now[0].value}, {0: past})
    assert j.rank == 0 and "30% below its own 30-day median" in j.reason


@pytest.mark.parametrize("change", ["profile", "software"])
def test_its_own_past_is_measured_the_same_way_or_not_compared(tmp_path: Path, change: str) -> None:
    # a week of nightly runs at the profile's large GEMMs, then a quick run at smaller ones: an H200's bf16
    # ran 733 TFLOP/s at 8192 and 519-566 at 4096 (2026-12-04), 25% "below its own median" while
    # healthy. A driver or torch upgrade (a new fingerprint) may move every device's speed at once.
    from chipcheck.fleet.judge.verdicts import own_history

    s = Store(tmp_path / "r.db")
    day = 86400.0
    for i, tf in enumerate([733.0, 730.0, 735.0, 731.0, 734.0]):
        s.begin_run(f"n{i}", host="h", profile="nightly", seed=0, argv=[], config={}, started=i * day)
        s.add_result(_mm(0, tf, case="bfloat16/random", n=8192, run=f"n{i}", started=i * day))
    n, fp = (4096, "fp1") if change == "profile" else (8192, "fp2")
    s.begin_run("now", host="h", profile="quick", seed=0, argv=[], config={}, started=5 * day)
    now = [_mm(0, 540.0, case="bfloat16/random", n=n, fp=fp, run="now", started=5 * day)]
    s.add_result(now[0])
    dev = {0: _dev(0, kind=DeviceKind.CUDA, fp=fp)}
    assert own_history(s, dev, now, "now", 5 * day) == []
    # measured the same way, the same figure is far below its past: slow
    like = [_mm(0, 540.0, case="bfloat16/random", n=8192, run="now", started=5 * day)]
    [j] = own_history(s, {0: _dev(0, kind=DeviceKind.CUDA)}, like, "now", 5 * day)
    assert j.verdict is Verdict.SLOW and "26% below its own 30-day median" in j.reason


@pytest.mark.parametrize("kind", [DeviceKind.CUDA, DeviceKind.CPU])
def test_a_copy_far_below_its_own_past_is_slow_on_a_gpu_but_the_hosts_on_a_cpu(tmp_path: Path,
                                                                               kind: DeviceKind) -> None:
    # a GPU's copy is its own HBM; a CPU device's is its host's memory system, which a large file
    # write or another tenant slows for every core (fleet.judge.speed.HOST_SHARED)
    from chipcheck.fleet.judge.verdicts import own_history

    s = Store(tmp_path / "r.db")
    day = 86400.0

    def bw(run: str, gbps: float, started: float) -> ProbeResult:
        return ProbeResult(run_id=run, host="h", rank=0, device=f"{kind.value}:0", fingerprint="fp1",
                           probe="bandwidth", case="copy", verdict=Verdict.PASS, seed=0,
                           metrics={"gbps_best": gbps}, device_uuid="u0", started=started)

    for i, gbps in enumerate([20.0, 20.4, 19.8, 20.1, 19.9]):
        s.begin_run(f"run{i}", host="h", profile="quick", seed=0, argv=[], config={}, started=i * day)
        s.add_result(bw(f"run{i}", gbps, i * day))
    s.begin_run("now", host="h", profile="quick", seed=0, argv=[], config={}, started=5 * day)
    now = [bw("now", 12.0, 5 * day)]
    s.add_result(now[0])
    js = own_history(s, {0: _dev(0, kind=kind)}, now, "now", 5 * day)
    assert [(j.rank, j.probe, j.verdict) for j in js] == ([(0, "bandwidth", Verdict.SLOW)] if kind is DeviceKind.CUDA
                                                           else [])
