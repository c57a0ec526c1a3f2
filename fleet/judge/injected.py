"""Injected faults that hit nothing: a run that passes with a fault no kernel of it matched proves
nothing about that fault, and says so.

Each result records the `--inject` faults on its rank and how many kernel calls each hit while the
case ran (`settings["inject_hits"]`, fleet.harness). A fault none of them hit (its op, dtype, `after`
or `after_s` matched no call of the run) gets a run-level finding. Hang and crash faults are left
out: a hit ends the process before its count is reported, and the watchdog's error says it anyway.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from ...results import ProbeResult

if TYPE_CHECKING:
    from ...probes.faults import Fault


def unfired(results: list[ProbeResult]) -> list[str]:
    """One finding per injected fault that hit no kernel call in any result that counted its hits."""
    hits: dict[str, int] = defaultdict(int)
    ranks: dict[str, set[int]] = defaultdict(set)
    for r in results:
        for spec, n in (r.settings.get("inject_hits") or {}).items():
            hits[spec] += int(n)
            ranks[spec].add(r.rank)
    out = []
    for spec, n in hits.items():
        f = _fault(spec)
        if n or f is None or f.kind in ("hang", "crash"):
            continue
        on = ", ".join(str(r) for r in sorted(ranks[spec]))
        out.append(f"--inject {spec!r} hit no kernel call of this run on rank {on} (it waits for {_waits_for(f)}): "
                   f"this run cannot show whether that fault is caught")
    return out


def _fault(spec: str) -> Fault | None:
    from ...probes import faults

    try:
        return faults.parse(spec)[0]
    except faults.InjectSpecError:  # a store written by another version: nothing to say about it
        return None


def _waits_for(f: Fault) -> str:
    """The calls the fault matches, in its spec's terms."""
    said = [f"op {f.op}" if f.op else "a GEMM, attention or convolution kernel (the default ops)"]
    said += [f"{k} {getattr(f, k)}" for k in ("dtype", "probe", "side") if getattr(f, k) not in (None, "send")]
    said += [f"{k} {getattr(f, k):g}" for k in ("after", "after_s", "every", "chance")
             if getattr(f, k) != {"every": 1, "chance": 1.0}.get(k, 0)]
    return ", ".join(said)
