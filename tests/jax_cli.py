"""`chipcheck run --backend jax` in a child process over N forced host CPU devices, for the JAX tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_jax(tmp_path: Path, devices: int, *args: str, timeout: float = 240) -> tuple[int, dict, str]:
    """(exit code, the --json document or {}, stdout + stderr); the store is tmp_path/r.db."""
    out = tmp_path / "run.json"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "chipcheck.cli", "run", "--backend", "jax", "--db",
                        str(tmp_path / "r.db"), "--json", str(out), "-q", "--min-gap", "0.9", *args],
                       capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, json.loads(out.read_text()) if out.exists() else {}, p.stdout + p.stderr
