"""Shared by the verdict benchmarks: one `chipcheck run` as a subprocess, its JSON report read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One run's per-device verdicts (and what the speed judge said), with its wall time."""

    rc: int
    verdicts: dict[int, str]
    slow_reasons: dict[int, list[str]]
    speed_notes: dict[int, list[str]]
    """Per rank: the speed judge's `slow` reasons and its notes on suspects it cleared or could not retest."""
    retested: bool
    """Whether a speed suspect was retested (the run has retest results)."""
    wall_s: float
    links_flagged: list[str]
    """`chipcheck links`: every directed link not `pass`, with its verdict and reason."""


def run(*args: str, timeout: float = 900, command: str = "run") -> Run:
    """`chipcheck run ARGS` (or `links`) in a fresh store; the verdict per rank from its JSON report."""
    with tempfile.TemporaryDirectory(prefix="cc-bench-") as d:
        out = Path(d) / "run.json"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "chipcheck.cli", command, "--db", str(Path(d) / "r.db"), "--json",
                            str(out), "-q", *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t0
        if not out.exists():
            raise RuntimeError(f"chipcheck run {' '.join(args)} wrote no report (exit {p.returncode}): "
                               f"{(p.stdout + p.stderr)[-2000:]}")
        data = json.loads(out.read_text())
    slow = {d["rank"]: [r for pr in d["probes"] for r in pr["details"].get("reasons", []) if r.startswith("slow")]
            for d in data["devices"]}
    notes = {d["rank"]: [r for pr in d["probes"] for r in pr["details"].get("reasons", [])
                         if r.startswith("speed suspect") or ", not judged: " in r] for d in data["devices"]}
    retested = any(pr["probe"] == "retest" and pr["details"].get("cases") for d in data["devices"] for pr in d["probes"])
    return Run(rc=p.returncode, verdicts={d["rank"]: d["verdict"] for d in data["devices"]},
               slow_reasons={k: v for k, v in slow.items() if v},
               speed_notes={k: v for k, v in notes.items() if v}, retested=retested, wall_s=wall,
               links_flagged=[f"{x['src']}->{x['dst']} {x['verdict']}: {x.get('reason', '')}"
                              for x in data.get("links") or [] if x["verdict"] != "pass"])


def machine() -> str:
    """What the figures were measured on: cores, CPU, torch."""
    import platform

    import torch

    return f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}"
