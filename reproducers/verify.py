"""Run a candidate repro.py as the vendor would, before it is written: a repro never lies.

On the reference (or with the simulated fault off) the file must exit 0; on the suspect (with the
simulated fault on, when the chip is simulated) it must exit 1. Anything else (a file that fails on a
healthy chip, one that does not fail on the suspect, one that crashes) is not a reproducer:
`chipcheck repro shrink` then writes nothing, says why in one line and exits 2.

The simulated chip (`--inject SPEC`, a probes/faults/ spec) is carried into repro.py's own tiny
hook (`hook_spec`): the kind and bit, and for a failure that needs history the op name and the
after/count window of the calls, as the shrinker's candidates saw it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..probes import faults as faultmod
from . import settings as st
from .trials import Evidence, counted

_HOOK_KINDS = ("bitflip", "nan")


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One run of the candidate file."""

    argv: list[str]
    rc: int
    tail: str

    def line(self) -> str:
        return f"`python repro.py {' '.join(self.argv)}` exit {self.rc}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """What running the candidate showed."""

    ok: bool
    runs: list[Run] = field(default_factory=list)
    reason: str = ""
    evidence: Evidence | None = None
    """The trials chip against chip, as the two runs counted them."""

    def line(self) -> str:
        done = "; ".join(r.line() for r in self.runs)
        if self.ok:
            return (f"verified: {done}" + (f" ({self.reason})" if self.reason else "")
                    + (f"\nevidence: {self.evidence.line()}" if self.evidence else ""))
        return f"not a reproducer: {self.reason}" + (f" ({done})" if done else "")


def hook_spec(inject: str | None, rank: int, *, op: str, history: bool, live: bool) -> str | None:
    """repro.py's `--inject` for the simulated fault of `inject` on `rank`, or None when there is no
    simulated fault (a real chip) or repro.py's hook cannot express it (then: unverifiable)."""
    if not inject:
        return None
    fs = [f for f in faultmod.parse(inject) if f.ranks is None or rank in f.ranks]
    if not fs:
        return None  # this rank is healthy in the simulation
    if len(fs) != 1 or fs[0].kind not in _HOOK_KINDS:
        return ""
    f = fs[0]
    parts = [f"bit={f.bit}"] if f.kind == "bitflip" else []
    if f.index is not None:
        parts.append(f"index={f.index}")
    if f.output:
        parts.append(f"output={f.output}")
    if f.chance < 1.0:  # intermittent: the file's generator, seeded alike, runs on across its runs
        parts += [f"chance={f.chance:g}", f"seed={f.seed}"]
    if history:  # the kept ops run before the last one: the hook must count calls as the candidates did
        if not live or f.every != 1:
            return ""
        parts.append(f"op={f.op or op.split('.')[1]}")
        parts += [f"{k}={v}" for k, v in (("after", f.after), ("count", f.count)) if v]
    return f"{f.kind}:" + ",".join(parts)


def collective_hook(inject: str | None, members: list[int] | None = None) -> str | None:
    """repro.py's `--inject` for a simulated bad link in a collective file (rank, kind, bit, index).
    `members`: the global rank each of the file's ranks stands for (a pair of a 4-rank job: 2 ranks);
    the fault's rank is translated into the file's ("" when it is none of them: not expressible)."""
    if not inject:
        return None
    fs = [f for f in faultmod.parse(inject) if f.kind in _HOOK_KINDS]
    ranks = fs[0].ranks if len(fs) == 1 else None
    if ranks is None or len(ranks) != 1:
        return ""
    f, rank = fs[0], ranks[0]
    if members:
        if rank not in members:
            return ""
        rank = members.index(rank)
    parts = [f"rank={rank}"] + ([f"bit={f.bit}"] if f.kind == "bitflip" else [])
    return f"{f.kind}:" + ",".join(parts + ([f"index={f.index}"] if f.index is not None else []))


def reference_device(reference: str, root: str) -> str:
    """Where the file's reference run goes: the reference's device (cpu64: the CPU)."""
    from . import replay as rp

    return rp.parse_reference(reference, root)[0]


def run_file(text: str, argv: list[str], *, timeout: float = 300.0) -> Run:
    """Run `text` as a file with `argv` in a fresh interpreter (as the vendor would)."""
    with tempfile.TemporaryDirectory(prefix="chipcheck-verify-") as tmp:
        path = Path(tmp) / "repro.py"
        path.write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHIPCHECK_")}
        try:
            p = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True,
                               timeout=timeout, cwd=tmp, env=env)
        except subprocess.TimeoutExpired:
            return Run(argv=argv, rc=124, tail=f"timed out after {timeout:.0f} s")
    tail = (p.stdout + p.stderr).strip().splitlines()
    return Run(argv=argv, rc=p.returncode, tail=tail[-1] if tail else "")


def verify(text: str, *, suspect: str, reference: str, hook: str | None, repeat: int = 1,
           timeout: float = 300.0, collective: bool = False) -> Verification:
    """Run the candidate on the reference (fault off) and on the suspect (fault on, when simulated).

    `hook`: repro.py's --inject for a simulated chip, None for a real one (then the suspect run is the
    file on `suspect` as it is), "" when the simulated fault cannot be expressed in the file.
    `collective`: the file spawns the recorded group here; without a simulated fault the suspect group
    is not on this host, so only the healthy run is checked (and said so)."""
    if collective and hook is None:
        clean = run_file(text, ["--device", reference, "--repeat", str(repeat)], timeout=timeout)
        if clean.rc != 0:
            return Verification(ok=False, runs=[clean], reason=f"it does not pass on a healthy {reference} group "
                                                               f"(last line: {clean.tail})")
        return Verification(ok=True, runs=[clean], reason="the suspect group is not here: run it there")
    if hook == "":
        return Verification(ok=False, reason="the simulated fault cannot be expressed by repro.py's --inject hook, "
                                              "so the file cannot be checked on the suspect")
    clean_dev = suspect if hook else reference
    clean = run_file(text, ["--device", clean_dev, "--repeat", str(repeat)], timeout=timeout)
    bad_argv = ["--device", suspect, "--repeat", str(repeat)] + (["--inject", hook] if hook else [])
    bad = run_file(text, bad_argv, timeout=timeout)
    runs = [clean, bad]
    where = "with the simulated fault off" if hook else f"on the reference {reference}"
    if clean.rc != 0:
        why = "it crashes" if clean.rc not in (0, 1) else "it fails"
        return Verification(ok=False, runs=runs, reason=f"{why} {where} (last line: {clean.tail})")
    if bad.rc != 1:
        why = "it crashes" if bad.rc not in (0, 1) else "it passes"
        return Verification(ok=False, runs=runs, reason=f"{why} on the suspect {suspect} (last line: {bad.tail})")
    kc, kb = counted(clean.tail), counted(bad.tail)
    evidence = Evidence(suspect=suspect + (" with the fault" if hook else ""), failed=kb[0], trials=kb[1],
                        reference=clean_dev + (" without it" if hook else ""), ref_failed=kc[0],
                        ref_trials=kc[1]) if kc and kb else None
    return Verification(ok=True, runs=runs, evidence=evidence)


def shrink_env(render: Callable[[dict[str, Any]], str], settings: dict[str, Any], *, suspect: str,
               hook: str | None, repeat: int = 1,
               timeout: float = 300.0) -> tuple[dict[str, Any], list[tuple[str, Run]]]:
    """`settings` without the environment variables the failure does not need. An environment variable
    is read when a library loads, so each is tried as the vendor would meet it: the candidate file
    rendered without it (it then clears it before torch loads) runs on the suspect (with the simulated
    fault, when simulated); it stays dropped when the file still fails (exit 1). One run per variable,
    returned with its key."""
    keep = dict(settings)
    runs: list[tuple[str, Run]] = []
    if hook == "":  # the suspect cannot be simulated by the file: nothing to try it on
        return keep, runs
    argv = ["--device", suspect, "--repeat", str(repeat)] + (["--inject", hook] if hook else [])
    for k in sorted(x for x in settings if x.startswith(st.ENV)):
        trial = {x: v for x, v in keep.items() if x != k}
        run = run_file(render(trial), argv, timeout=timeout)
        runs.append((k, run))
        if run.rc == 1:
            keep = trial
    return keep, runs
