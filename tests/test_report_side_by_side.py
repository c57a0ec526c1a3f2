"""`chipcheck report A B`: a torch run and a JAX run of one host's devices in one report, side by side,
each judged as it was (a fingerprint holds the backend, so no consensus vote mixes them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from chipcheck.reports import formats  # noqa: E402

JAX2 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}


def _cc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chipcheck.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _run_id(db: Path) -> str:
    p = _cc("report", "--db", str(db), "--format", "json")
    return json.loads(p.stdout)["run_id"]


def test_a_torch_run_and_a_jax_run_in_one_report(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    p = _cc("run", "--devices", "cpu:2", "--probes", "matmul", "--db", str(db), "-q", "--min-gap", "0.9")
    assert p.returncode == 0, p.stderr[-2000:]
    torch_run = _run_id(db)
    p = _cc("run", "--backend", "jax", "--probes", "matmul", "--db", str(db), "-q", "--min-gap", "0.9",
            "--inject", "bitflip:rank=1,bit=20", env=JAX2)
    assert p.returncode == 1, p.stderr[-2000:]
    jax_run = _run_id(db)
    assert jax_run != torch_run

    p = _cc("report", torch_run, jax_run, "--db", str(db), "--format", "json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    jsonschema.validate(doc, formats.json_schema())
    assert doc["run_id"] == f"{torch_run}+{jax_run}" and doc["verdict"] == "wrong"
    devs = {d["rank"]: d for d in doc["devices"]}
    assert [devs[r]["verdict"] for r in range(4)] == ["pass", "pass", "pass", "wrong"]
    assert devs[0]["uuid"].startswith("cpu-") and devs[2]["uuid"].startswith("jax-")
    # one fingerprint per backend: the two runs' devices never share a consensus vote
    assert devs[0]["fingerprint"] == devs[1]["fingerprint"] != devs[2]["fingerprint"] == devs[3]["fingerprint"]
    assert any(re.search(rf"run {jax_run}: ranks 2-3, backend jax", f) for f in doc["findings"])

    html = tmp_path / "both.html"
    p = _cc("report", torch_run, jax_run, "--db", str(db), "--format", "html", "-o", str(html))
    assert p.returncode == 1 and "jax-" in html.read_text()
    # one id is the ordinary single-run report; an unknown id is a clear usage error
    assert _cc("report", torch_run, "--db", str(db)).returncode == 0
    bad = _cc("report", torch_run, "nope", "--db", str(db))
    assert bad.returncode == 2 and "no run 'nope'" in bad.stderr
