"""Blame matrix: a fault that acts like a bad chip (on every kernel of its process) fails that device
and only that device, whichever rank it is on, in a whole default run on 4 CPU workers.

Each entry is one whole `chipcheck run --devices cpu:4 --profile quick` (every default probe); the
assertions are per device and per probe: the faulty device is not `pass`, and no other device fails
any probe (a device that only received bad data passes, with a note saying from whom).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, run_json

from chipcheck.probes import faults

# Corruption is judged here, not speed: only a 10x shortfall would count as slow, so two tests
# sharing the CI host's two cores cannot make an innocent device slow (speed: the timing tests).
NO_SPEED = ("--min-gap", "0.9")
RUN = ("--devices", "cpu:4", "--profile", "quick")

FAULTS = faults.CHIP_FAULTS


def blamed(data: dict) -> dict[int, str]:
    return {d["rank"]: d["verdict"] for d in data["devices"] if d["verdict"] != "pass"}


def innocent_failures(data: dict, faulty: int) -> list[str]:
    return [f"rank {d['rank']} {p['probe']} {p['verdict']}: {p['details'].get('reasons', [''])[0][:300]}"
            for d in data["devices"] if d["rank"] != faulty for p in d["probes"] if p["verdict"] != "pass"]


@pytest.mark.parametrize("faulty", [0, 3])
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_only_the_faulty_chip_is_blamed(tmp_path: Path, kind: str, faulty: int) -> None:
    rc, data, out = run_json(tmp_path, *RUN, *NO_SPEED, "--inject", FAULTS[kind].format(r=faulty), timeout=600)
    assert rc == 1, out[-3000:]
    assert innocent_failures(data, faulty) == []
    assert list(blamed(data)) == [faulty], out[-3000:]
    assert data["summary"]["failed"] == 1 and data["summary"]["failed_fraction"] == 0.25


@pytest.mark.timing
def test_a_whole_default_run_with_one_bad_chip_fails_one_device_in_four(tmp_path: Path) -> None:
    # speed is judged too here (timing phase): the bad chip's peers are neither wrong nor slow
    rc, data, out = run_json(tmp_path, *RUN, "--inject", FAULTS["bitflip-fp32-every-2nd"].format(r=1), timeout=600)
    assert rc == 1, out[-3000:]
    assert innocent_failures(data, 1) == [] and list(blamed(data)) == [1]
    report = run_cli("report", "latest", "--db", str(tmp_path / "results.db"))
    assert "1/4 devices = 25.0% failing" in report.stdout, report.stdout[-2000:]


@pytest.mark.timing
def test_a_clean_default_run_calls_nobody_slow_or_wrong(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, *RUN, timeout=600)
    assert rc == 0 and blamed(data) == {}, out[-3000:]

