"""Every default probe's JSON, failures included, validates against the documented schema."""

from __future__ import annotations

from pathlib import Path

import jsonschema
from conftest import run_json

from chipcheck.reports import formats


def test_a_default_run_with_faults_validates(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, "--devices", "cpu:2", "--min-gap", "0.9",
                             "--inject", "bitflip:rank=1,bit=27,probe=attention",
                             "--inject", "bitflip:rank=0,bit=27,probe=matmul,dtype=float32")
    assert rc == 1, out
    jsonschema.validate(data, formats.json_schema())
    probes = {p["probe"] for d in data["devices"] for p in d["probes"]}
    assert {"matmul", "attention", "memory", "bandwidth", "xgemm", "model_step", "collectives", "model_dp"} <= probes
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "wrong", 1: "wrong"}
