"""The pytest plugin (`pytest --chipcheck`), run through pytest's own pytester in subprocesses."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]


def test_inert_without_the_option(pytester: pytest.Pytester) -> None:
    # installed into every session of the environment: an ordinary suite must run as if it were absent
    pytester.makepyfile(test_plain="def test_one():\n    assert 1 + 1 == 2\n")
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    r.assert_outcomes(passed=1)
    assert "chipcheck fleet judgement" not in r.stdout.str() and "chipcheck::" not in r.stdout.str()
    assert "--chipcheck-devices" in pytester.runpytest_subprocess("--help").stdout.str()


def test_items_are_device_x_probe_and_k_selects(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_one():\n    assert False\n")  # not collected under --chipcheck
    r = pytester.runpytest_subprocess("--chipcheck=quick", "--chipcheck-devices", "cpu:3", "--chipcheck-probes",
                                      "matmul", "--collect-only", "-q", "-k", "cpu:1 or cpu:2")
    out = r.stdout.str()
    assert "chipcheck::matmul[cpu:1]" in out and "chipcheck::matmul[cpu:2]" in out
    assert "matmul[cpu:0]" not in out and "test_one" not in out
    assert "2/3 tests collected (1 deselected)" in out


def test_bad_profile_is_a_usage_error(pytester: pytest.Pytester) -> None:
    r = pytester.runpytest_subprocess("--chipcheck=fastest")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown profile 'fastest'" in r.stderr.str()


def test_injected_fault_fails_its_item_on_its_pinned_worker(pytester: pytest.Pytester) -> None:
    junit = pytester.path / "junit.xml"
    r = pytester.runpytest_subprocess("--chipcheck=quick", "--chipcheck-devices", "cpu:2", "--chipcheck-probes",
                                      "matmul", "--chipcheck-inject", "bitflip:rank=1,bit=20",
                                      "--chipcheck-min-gap", "0.95", "-n", "2", f"--junitxml={junit}",
                                      "-p", "no:cacheprovider", timeout=240)
    r.assert_outcomes(passed=1, failed=1)
    out = r.stdout.str()
    assert "FAILED chipcheck::matmul[cpu:1]" in out and "flipped bits [20]" in out
    assert "chipcheck fleet judgement" in out and "consensus" in out  # the controller judged the fleet
    root = ET.parse(junit).getroot()
    cases = {tc.get("name"): tc for tc in root.iter("testcase")}
    assert set(cases) == {"matmul[cpu:0]", "matmul[cpu:1]"}
    assert cases["matmul[cpu:1]"].find("failure") is not None
    for name, worker in (("matmul[cpu:0]", "gw0"), ("matmul[cpu:1]", "gw1")):  # pinned by worker id
        props = {p.get("name"): p.get("value") for p in cases[name].iter("property")}
        assert props["xdist_worker"] == worker
