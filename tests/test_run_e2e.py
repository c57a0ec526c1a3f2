"""`chipcheck run` end to end: real worker processes, real SQLite, injected faults, exact verdicts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import device, probe_of, run_json

MATMUL = ("--probes", "matmul", "--devices", "cpu:4")
# Tests of corruption, hangs and crashes judge no speed: only a 10x shortfall would count as slow,
# so a busy CI host cannot turn their innocent devices slow (tests marked `timing` judge speed).
NO_SPEED = ("--min-gap", "0.9")


def _verdicts(data: dict) -> dict[int, str]:
    return {d["rank"]: d["verdict"] for d in data["devices"]}


def _bits(dev: dict) -> set[int]:
    out: set[int] = set()
    for p in dev["probes"]:
        for c in p["details"]["cases"]:
            for m in c.get("mismatches", []):
                out |= {int(b) for b in m["bit_histogram"]}
    return out


@pytest.mark.timing
def test_clean_run_passes(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, *MATMUL)
    assert rc == 0, out
    assert data["schema"] == "chipcheck.run/1" and data["verdict"] == "pass"
    assert _verdicts(data) == {0: "pass", 1: "pass", 2: "pass", 3: "pass"}
    assert len({d["host"] for d in data["devices"]}) == 1
    # every case stored, with the settings that change bits
    # (a speed suspect's interleaved retest, if the host was noisy, adds its own rows)
    rows = sqlite3.connect(tmp_path / "results.db").execute(
        "SELECT count(*), count(DISTINCT rank) FROM results WHERE probe != 'retest'")
    assert rows.fetchone() == (24, 4)
    assert "verdict: PASS" in out


def test_exponent_flip_in_fp32_on_one_worker(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, *MATMUL, *NO_SPEED, "--inject", "bitflip:rank=2,bit=27,dtype=float32")
    assert rc == 1, out
    assert _verdicts(data) == {0: "pass", 1: "pass", 2: "wrong", 3: "pass"}
    dev = device(data, 2)
    assert _bits(dev) == {27}
    probe = probe_of(data, 2, "matmul")
    exact = next(c for c in probe["details"]["cases"] if c["case"] == "float32/exact")
    m = exact["mismatches"][0]
    assert m["oracle"] == "exact" and m["bad_elements"] == 1 and exact["repeats_bad"] == exact["repeats"]
    assert m["first_indices"] and len(m["expected_bits"][0]) == 32
    assert any("consensus" in r for r in probe["details"]["reasons"])


def test_mantissa_flip_in_bf16_at_a_rate(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, *MATMUL, *NO_SPEED, "--inject", "bitflip:rank=1,bit=2,rate=0.01,dtype=bfloat16")
    assert rc == 1, out
    assert _verdicts(data) == {0: "pass", 1: "wrong", 2: "pass", 3: "pass"}
    assert _bits(device(data, 1)) == {2}


@pytest.mark.timing
def test_slow_worker_is_slow_and_nobody_else(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, *MATMUL, "--inject", "slow:rank=1,factor=1.3")
    assert rc == 1, out
    assert _verdicts(data) == {0: "pass", 1: "slow", 2: "pass", 3: "pass"}
    # suspected from the matmul probe, called slow only by the interleaved retest against a peer
    probes = {p["probe"]: p for p in device(data, 1)["probes"]}
    assert probes["matmul"]["verdict"] == "pass" and probes["retest"]["verdict"] == "slow"
    m = probes["retest"]["metrics"]
    # retested on the GEMM, in the dtype its evidence is strongest in where one stands out (on a CPU the
    # busy-wait of `slow` stretches bf16's multi-threaded wall time more than its CPU time: 0.38x in CI)
    (kernel,) = {k.partition(":")[0] for k in m if k.endswith(":ratio")}
    assert kernel.partition(".")[0] == "gemm" and 0.6 < m[f"{kernel}:ratio"] < 0.9 and m[f"{kernel}:ratio_hi"] < 0.95
    assert "confirmed by retest" in " ".join(probes["retest"]["details"]["reasons"])


def test_hang_is_an_error_and_the_others_are_kept(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, *MATMUL, *NO_SPEED, "--inject", "hang:rank=3", "--timeout", "8")
    assert rc == 1, out
    why = [(r, c["error"]) for r in (0, 1, 2) for c in probe_of(data, r, "matmul")["details"]["cases"] if c.get("error")]
    assert _verdicts(data) == {0: "pass", 1: "pass", 2: "pass", 3: "error"}, why[:3]
    cases = probe_of(data, 3, "matmul")["details"]["cases"]
    assert cases[0]["error"]["kind"] == "timeout" and "watchdog" in cases[0]["error"]["message"]
    assert all(c["verdict"] == "error" for c in cases)
    # the other devices' results are all there
    assert all(len(probe_of(data, r, "matmul")["details"]["cases"]) == 6 for r in (0, 1, 2))


def test_crash_is_an_error_naming_the_signal(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, "--probes", "matmul", "--devices", "cpu:2", *NO_SPEED, "--inject", "crash:rank=0")
    assert rc == 1, out
    assert _verdicts(data) == {0: "error", 1: "pass"}
    first = probe_of(data, 0, "matmul")["details"]["cases"][0]
    assert first["error"]["kind"] == "crash" and "signal 9" in first["error"]["message"]


def test_nan_is_caught(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, "--probes", "matmul", "--devices", "cpu:2", *NO_SPEED, "--inject", "nan:rank=0")
    assert rc == 1, out
    assert _verdicts(data) == {0: "wrong", 1: "pass"}
    oracles = {m["oracle"] for c in probe_of(data, 0, "matmul")["details"]["cases"] for m in c.get("mismatches", [])}
    assert "nonfinite" in oracles and "exact" in oracles
