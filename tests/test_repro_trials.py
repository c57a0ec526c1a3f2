"""Intermittent failures: a trial plan that sees them, and evidence chip against chip with its p-value."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from chipcheck.probes import faults
from chipcheck.reproducers import capture, trials


def test_a_plan_sees_the_failure_with_the_promised_probability_at_the_rates_lower_bound() -> None:
    assert trials.plan(24, 24) == 1  # a hard fault shows every time
    for k, n in [(3, 24), (6, 24), (12, 24), (23, 24), (250, 1000)]:
        p = trials.wilson_low(k, n)
        m = trials.plan(k, n)
        assert 1 - (1 - p) ** m >= trials.DETECTION > 1 - (1 - p) ** (m - 1)
    # with many trials the bound meets the rate: a 25% fault needs 25 runs for 99.9%
    assert trials.plan(250_000, 1_000_000) == math.ceil(math.log(0.001) / math.log(0.75))
    assert trials.plan(1, 10_000) == trials.MAX_TRIALS  # capped, never for ever
    with pytest.raises(ValueError):
        trials.plan(0, 24)


def test_fisher_exact_one_sided_matches_the_hypergeometric_tail() -> None:
    # 7 of 24 on the suspect, 0 of 24 on the reference: only the observed split is as extreme
    assert trials.fisher_greater(7, 24, 0, 24) == pytest.approx(math.comb(24, 7) / math.comb(48, 7))
    assert trials.fisher_greater(0, 24, 0, 24) == 1.0
    assert trials.fisher_greater(3, 10, 3, 10) > 0.5  # the same rate on both: no evidence
    e = trials.Evidence(suspect="cuda:0", failed=7, trials=24, reference="cuda:1", ref_failed=0, ref_trials=24)
    assert e.line() == "failed 7 of 24 trials on cuda:0; 0 of 24 on cuda:1; p = 0.0047 (Fisher's exact test, one-sided)"
    assert trials.counted("REPRODUCED: 3 of 25 runs wrong (tolerance ...)") == (3, 25)
    assert trials.counted("something else") is None


def test_an_intermittent_fault_hits_about_its_chance_and_the_same_way_for_the_same_seed() -> None:
    a, b = torch.ones(4, 4), torch.ones(4, 4)

    def pattern(seed: int) -> list[bool]:
        faults.CHANCE_DRAWS.clear()  # a fresh process
        (f,) = faults.parse(f"bitflip:bit=30,op=mm,chance=0.25,seed={seed},at=call")
        hits = []
        for _ in range(400):  # one injector per trial, as replay and shrink use them
            with faults.make_injector([f], 0, "p")():
                out = a @ b
            hits.append(not torch.equal(out, a @ b))
        return hits

    first = pattern(1)
    assert 60 <= sum(first) <= 140  # 100 expected
    assert pattern(1) == first and pattern(2) != first
    with pytest.raises(faults.InjectSpecError, match="chance"):
        faults.parse("bitflip:bit=3,chance=0")
    assert faults.parse("bitflip:bit=3,chance=0.5,seed=4")[0].spec() == "bitflip:bit=3,chance=0.5,seed=4"


SPEC = "bitflip:rank=0,bit=25,op=mm,chance=0.3,seed=3,at=call"


def test_an_intermittent_fault_yields_a_repro_with_a_trial_plan_and_evidence(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 7
    with capture(root):
        h = (w @ w).relu()
        (h @ w).sum()
    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(root), "--inject", SPEC, "-o", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"intermittent: failed (\d+) of 24 trials on cpu; (\d+) runs", p.stdout)
    assert m, p.stdout
    k, plan = int(m.group(1)), int(m.group(2))
    assert 0 < k < 24 and plan == trials.plan(k, 24) > 10
    ev = re.search(r"evidence: failed (\d+) of (\d+) trials on cpu with the fault; 0 of \2 on cpu without it; "
                   r"p = (\S+) \(Fisher", p.stdout)
    assert ev and int(ev.group(2)) == plan and 0 < int(ev.group(1)) < plan, p.stdout
    assert float(ev.group(3)) == pytest.approx(trials.fisher_greater(int(ev.group(1)), plan, 0, plan), rel=0.05)
    text = out.read_text()
    assert f"(--repeat {plan} by default)" in text and "Evidence: failed" in text
    # the vendor's default run: the trial plan, without the fault passes, with it reproduces
    clean = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0 and f"0 of {plan} runs wrong" in clean.stdout, clean.stdout + clean.stderr
    bad = subprocess.run([sys.executable, str(out), "--inject", "bitflip:bit=25,chance=0.3,seed=3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and f"of {plan} runs wrong" in bad.stdout, bad.stdout + bad.stderr
    # the bundle's README carries the trial plan and the evidence
    b = run_cli("repro", "bundle", str(out), "-o", str(tmp_path / "b.tar.gz"))
    assert b.returncode == 0, b.stderr
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        readme = tar.extractfile("bundle/README.md").read().decode()  # type: ignore[union-attr]
    assert "Trials: intermittent: failed" in readme and "Evidence: failed" in readme and "p = " in readme
