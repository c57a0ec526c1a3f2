"""OCP Test & Validation output and Prometheus metrics: checked against the spec's own JSON schema and
prometheus-client's own parser, on synthetic runs (every verdict, fast) and on one real faulted run
through the CLI (`run --report`, `report --report`, `export prometheus`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
from conftest import run_cli
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource

from chipcheck import failures
from chipcheck.fleet import synthetic
from chipcheck.reports import formats, ocp, prom
from chipcheck.reports.extras import HistoryPoint, ReportExtras
from chipcheck.results import Judgement, RunStatus, Verdict

SPEC = Path(__file__).parent / "data" / "ocp-diag-core"


def _validator() -> jsonschema.Draft202012Validator:
    """root.json of the vendored OCP output spec, the other schema files resolved by their $id."""
    docs = [json.loads(p.read_text()) for p in sorted(SPEC.glob("*.json"))]
    registry = Registry().with_resources((d["$id"], Resource.from_contents(d)) for d in docs)
    root = json.loads((SPEC / "root.json").read_text())
    return jsonschema.Draft202012Validator(root, registry=registry,
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _valid_lines(text: str) -> list[dict]:
    v = _validator()
    lines = [json.loads(x) for x in text.splitlines()]
    for n, doc in enumerate(lines):
        errors = list(v.iter_errors(doc))
        assert not errors, f"line {n}: {errors[0].message}"
    return lines


def _diagnoses(lines: list[dict]) -> list[tuple[str, dict]]:
    """(hardwareInfoId, diagnosis) for every diagnosis in the output."""
    return [(a["testStepArtifact"]["diagnosis"].get("hardwareInfoId", ""), a["testStepArtifact"]["diagnosis"])
            for a in lines if "diagnosis" in a.get("testStepArtifact", {})]


def _hw_of(lines: list[dict]) -> dict[str, dict]:
    """hardwareInfoId -> the device's entry in the DUT metadata (rank, uuid, ...)."""
    start = lines[1]["testRunArtifact"]["testRunStart"]
    return {d["hardwareInfoId"]: d for d in start["dutInfo"]["metadata"]["devices"]}


@pytest.fixture(scope="module")
def mixed():
    """A synthetic 10-device run with one device each wrong x2, slow, flaky, error; rank 1 made `suspect`."""
    f = synthetic.fleet(10, fail_fraction=0.5, seed=0)
    s, _ = synthetic.judge(f)
    sus = next(d for d in s.devices if d.verdict is Verdict.PASS)
    probes = [replace(p, verdict=Verdict.SUSPECT,
                      fleet=[Judgement(rank=sus.rank, probe=p.probe, case="*", verdict=Verdict.SUSPECT,
                                       reason="suspect: a shared loss went wrong in its group")])
              for p in sus.probes]
    devices = [replace(d, verdict=Verdict.SUSPECT, probes=probes) if d is sus else d for d in s.devices]
    s = replace(s, devices=devices)
    return s, ReportExtras(devices={d.uuid: d for d in f.devices.values()}, min_gap=0.1)


def test_the_schema_is_the_spec_and_catches_a_bad_line() -> None:
    bad = {"sequenceNumber": 1, "timestamp": "2026-01-01T00:00:00Z",
           "testStepArtifact": {"testStepId": "0", "diagnosis": {"verdict": "x", "type": "WRONG"}}}
    assert list(_validator().iter_errors(bad))
    assert "github.com/opencomputeproject/ocp-diag-core" in (SPEC / "SOURCE.md").read_text()


def test_ocp_output_is_valid_and_every_verdict_maps(mixed) -> None:
    s, extras = mixed
    lines = _valid_lines(formats.render(s, "ocp", extras))
    assert lines[0]["schemaVersion"] == {"major": 2, "minor": 0}
    assert lines[-1]["testRunArtifact"]["testRunEnd"] == {"status": "COMPLETE", "result": "FAIL"}
    hw = _hw_of(lines)
    assert {d["uuid"] for d in hw.values()} == {d.uuid for d in s.devices}
    dut = lines[1]["testRunArtifact"]["testRunStart"]["dutInfo"]
    assert {(x["name"], x["version"]) for x in dut["softwareInfos"]} >= {("driver", "550.54"), ("driver", "535.161")}
    final = {hw[h]["rank"]: d for h, d in _diagnoses(lines) if d["verdict"].startswith("device-")}
    assert len(final) == len(s.devices)
    want_type = {Verdict.PASS: "PASS", Verdict.WRONG: "FAIL", Verdict.SLOW: "FAIL", Verdict.FLAKY: "FAIL",
                 Verdict.ERROR: "FAIL", Verdict.SUSPECT: "UNKNOWN"}
    seen = set()
    for d in s.devices:
        got = final[d.rank]
        assert got["verdict"] == f"device-{d.verdict.value}"
        assert got["type"] == want_type[d.verdict]
        code = failures.worst([c for c in (failures.for_probe(p) for p in d.probes) if c])
        assert got["message"].startswith(f"[{code.code} ") if code else not got["message"].startswith("[")
        seen.add(d.verdict)
    assert seen == set(want_type)  # the fixture covers every verdict


def test_ocp_measurements_carry_validators_and_findings_are_diagnoses(mixed) -> None:
    s, extras = mixed
    lines = _valid_lines(ocp.render(s, extras))
    steps = [a["testStepArtifact"] for a in lines if "testStepArtifact" in a]
    measurements = [x["measurement"] for x in steps if "measurement" in x]
    assert any(m["name"] == "tflops" and m["unit"] == "TFLOP/s" and not m.get("validators") for m in measurements)
    exact = [m for m in measurements if m["name"] == "repeats_bad"]
    assert exact and all(m["validators"][0]["type"] == "EQUAL" and m["validators"][0]["value"] == 0 for m in exact)
    peers = [m for m in measurements if m["name"].endswith("ratio_to_peers")]
    assert peers and peers[0]["validators"][0] == {"name": peers[0]["validators"][0]["name"], "type": "GREATER_THAN",
                                                   "value": pytest.approx(0.9)}
    slow = next(d for d in s.devices if d.verdict is Verdict.SLOW)
    hw = {v["rank"]: k for k, v in _hw_of(lines).items()}
    mine = [d for h, d in _diagnoses(lines) if h == hw[slow.rank]]
    assert any(d["verdict"] == "matmul-slow" and d["message"].startswith("[CC-PERF-001 medium retest] slow:")
               for d in mine)
    error = next(d for d in s.devices if d.verdict is Verdict.ERROR)
    assert any(x.get("error", {}).get("symptom") == "timeout" for x in steps)
    assert any(d["verdict"] == "matmul-error" and "CC-ERR-001" in d["message"]
               for h, d in _diagnoses(lines) if h == hw[error.rank])
    # rendering is pure: the same run gives the same bytes (timestamps are the run's own)
    assert ocp.render(s, extras) == ocp.render(s, extras)


def test_a_run_cut_short_never_reads_as_a_pass() -> None:
    """Before, an interrupted run whose measured devices all passed printed `verdict: PASS`, and its OCP
    run ended COMPLETE / PASS: a burn-in stopped halfway read as a clean one."""
    f = synthetic.fleet(4, fail_fraction=0.0, seed=0)
    s, _ = synthetic.judge(f)
    assert s.verdict is Verdict.PASS
    cut = replace(s, status=RunStatus.INTERRUPTED)
    assert formats.render(cut, "text").splitlines()[-1].startswith("verdict: INTERRUPTED  (so far: pass=4;")
    assert formats.render(s, "text").splitlines()[-1].startswith("verdict: PASS  (pass=4;")
    assert '<h1 id="verdict">INTERRUPTED — 0 of 4 devices failing' in formats.render(cut, "html")
    junit = formats.render(replace(cut, missing=["rank 2 matmul float32/exact"]), "junit")
    assert 'classname="chipcheck.run" name="run reached its end"' in junit and "rank 2 matmul float32/exact" in junit
    assert '<testsuites name="chipcheck" tests="' in junit and 'errors="0"' not in junit.split("\n")[1]
    end = _valid_lines(formats.render(cut, "ocp"))[-1]["testRunArtifact"]["testRunEnd"]
    assert end == {"status": "ERROR", "result": "NOT_APPLICABLE"}
    (info,) = _samples(prom.render(cut))["chipcheck_run_info"]
    assert (info.labels["verdict"], info.labels["status"]) == ("pass", "interrupted")
    wrong = next(d for d in synthetic.judge(synthetic.fleet(4, fail_fraction=0.5, seed=0))[0].devices
                 if d.verdict is Verdict.WRONG)
    bad = replace(cut, devices=[wrong, *cut.devices[1:]], verdict=Verdict.WRONG)
    assert formats.render(bad, "text").splitlines()[-1].startswith("verdict: WRONG, run INTERRUPTED  (so far:")
    assert _valid_lines(formats.render(bad, "ocp"))[-1]["testRunArtifact"]["testRunEnd"]["result"] == "FAIL"


def _samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_prometheus_text_parses_back_with_the_values(mixed) -> None:
    s, extras = mixed
    wrong = next(d for d in s.devices if d.verdict is Verdict.WRONG)
    history = {wrong.uuid: [HistoryPoint(run_id="old", started=s.ended - 3 * 86400, verdict=Verdict.PASS),
                            HistoryPoint(run_id=s.run_id, started=s.started, verdict=Verdict.WRONG)]}
    m = _samples(prom.render(s, replace(extras, history=history)))
    assert m["chipcheck_run_failing_fraction"][0].value == pytest.approx(0.5)
    assert m["chipcheck_run_suspect_devices"][0].value == 1
    on = {(x.labels["uuid"], x.labels["verdict"]) for x in m["chipcheck_device_verdict"] if x.value == 1}
    assert on == {(d.uuid, d.verdict.value) for d in s.devices}
    codes = {x.labels["uuid"]: x.labels["code"] for x in m["chipcheck_device_failure"]}
    assert codes[wrong.uuid] == "CC-SDC-001"
    assert {x.labels["uuid"] for x in m["chipcheck_device_failing"] if x.value == 1} == {d.uuid for d in s.failed}
    days = {x.labels["uuid"]: x.value for x in m["chipcheck_device_days_since_pass"]}
    assert days[wrong.uuid] == pytest.approx(3.0)
    assert all(days[d.uuid] == 0 for d in s.devices if d.verdict is Verdict.PASS)
    assert not any(d.uuid in days for d in s.devices if d.verdict not in (Verdict.PASS,) and d is not wrong)
    tf = {(x.labels["uuid"], x.labels["case"]): x.value for x in m["chipcheck_device_tflops"]}
    p = wrong.probes[0]
    assert tf[(wrong.uuid, "bfloat16/random")] == p.metrics["bfloat16/random:tflops"]
    assert set(m["chipcheck_device_verdict"][0].labels) == {"host", "uuid", "fingerprint", "device", "verdict"}


@pytest.fixture(scope="module")
def faulted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-device run in which rank 1 flips bit 20, written as OCP and Prometheus by `chipcheck run`."""
    d = tmp_path_factory.mktemp("ocp")
    p = run_cli("run", "--devices", "cpu:2", "--probes", "matmul", "--db", str(d / "r.db"), "--min-gap", "0.9",
                "--inject", "bitflip:rank=1,bit=20", "--report", f"ocp={d / 'run.jsonl'}",
                "--report", f"prom={d / 'run.prom'}")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"in {d / 'r.db'}" in p.stderr and "chipcheck report " in p.stderr  # where the results went
    assert "[   1] rank " in p.stderr  # not a terminal: one greppable line per case
    return d


def test_a_faulted_run_carries_the_right_diagnoses(faulted: Path) -> None:
    lines = _valid_lines((faulted / "run.jsonl").read_text())
    hw = {v["rank"]: k for k, v in _hw_of(lines).items()}
    bad = [d for h, d in _diagnoses(lines) if h == hw[1] and d["type"] == "FAIL"]
    assert any(d["verdict"] == "matmul-wrong" and d["message"].startswith("[CC-SDC-001 critical replace_chip]")
               and "flipped bits [20]" in d["message"] for d in bad)
    assert any(d["verdict"] == "device-wrong" for d in bad)
    assert not [d for h, d in _diagnoses(lines) if h == hw[0] and d["type"] != "PASS"]
    assert lines[-1]["testRunArtifact"]["testRunEnd"]["result"] == "FAIL"


def test_a_faulted_run_as_prometheus_and_the_export_command(faulted: Path, tmp_path: Path) -> None:
    m = _samples((faulted / "run.prom").read_text())
    assert m["chipcheck_run_failing_fraction"][0].value == 0.5
    verdict = {x.labels["device"]: x.labels["verdict"] for x in m["chipcheck_device_verdict"] if x.value == 1}
    assert verdict == {"cpu:0": "pass", "cpu:1": "wrong"}
    assert [x.labels["code"] for x in m["chipcheck_device_failure"]] == ["CC-SDC-001"]
    assert {x.labels["device"]: x.value for x in m["chipcheck_device_days_since_pass"]} == {"cpu:0": 0.0}
    assert all(x.value > 0 for x in m["chipcheck_device_tflops"])
    out = tmp_path / "chipcheck.prom"
    p = run_cli("export", "prometheus", "--db", str(faulted / "r.db"), "-o", str(out))
    assert p.returncode == 0, p.stderr
    exported = _samples(out.read_text())  # the stored run: the same values (its end time is the store's)
    assert exported.keys() == m.keys()
    for name in m.keys() - {"chipcheck_run_end_timestamp_seconds"}:
        assert [(x.labels, x.value) for x in exported[name]] == [(x.labels, pytest.approx(x.value)) for x in m[name]]
    p = run_cli("report", "latest", "--db", str(faulted / "r.db"), "--report", f"ocp={tmp_path / 'again.jsonl'}")
    assert p.returncode == 1
    again = (tmp_path / "again.jsonl").read_text().splitlines()
    first = (faulted / "run.jsonl").read_text().splitlines()
    assert [json.loads(x).get("testStepArtifact", {}).get("diagnosis") for x in again] == \
        [json.loads(x).get("testStepArtifact", {}).get("diagnosis") for x in first]
    p = run_cli("export", "prometheus", "--db", str(faulted / "r.db"), "--run", "nope", "-o", str(out))
    assert p.returncode == 2 and "no run 'nope'" in p.stderr
