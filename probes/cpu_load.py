"""How busy the host was while a CPU device took its retest turns: what its speed shares with other work.

A CPU device is a core of a host that runs other work too, and that work slows it in ways its own
thread's CPU time cannot see: a tenant on another core competes for the memory system and, on a
virtual machine, for the host's shared physical cores. In an interleaved retest the tenant takes more
of the host while one device computes than while the other does (the other device's core is then its
to share): with a memory-bound process pinned to core 1, core 0 was confirmed `slow` at 0.88x of
core 1 (2026-12-04), and under the parallel test suite's load core 1 at 0.81x of core 0 (CI).
`HostBusy` measures it from /proc/stat (Linux): the share of all the host's CPU time the kernel counted
busy (steal included: another VM) over the spans it is entered for. Both devices of a pair leave the
same busy work of their own in each other's turns (one computes, one waits), so the difference between
their turns' shares is the other work's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
_BUSY = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (idle 3 and iowait 4 left out)


def busy_per_cpu(stat: Path = Path("/proc/stat")) -> dict[int, float] | None:
    """Seconds the kernel counted busy since boot on each of the host's CPUs; None where /proc/stat
    cannot tell."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    per = {int(name[3:]): sum(int(fields[i]) for i in _BUSY if i < len(fields)) * _TICK_S
           for name, *fields in (line.split() or [""] for line in lines) if name.startswith("cpu") and name[3:].isdigit()}
    return per or None


def busy_s(stat: Path = Path("/proc/stat"), cores: frozenset[int] | None = None) -> tuple[float, int] | None:
    """(seconds the kernel counted busy since boot on `cores`, or all the host's CPUs, how many CPUs);
    None where /proc/stat cannot tell."""
    per = busy_per_cpu(stat)
    return _sum(per, cores) if per else None


def _sum(per: dict[int, float], cores: frozenset[int] | None) -> tuple[float, int] | None:
    picked = [v for c, v in per.items() if cores is None or c in cores]
    return (sum(picked), len(picked)) if picked and (cores is None or len(picked) == len(cores)) else None


class HostBusy:
    """Accumulates, over the spans it is entered for, how busy the host was (`share`: busy CPU time over the
    CPU time it offered) and how much of this process's own cores other processes took (`foreign_share`:
    their busy time less this process's CPU time, over the time those cores offered); None where
    /proc/stat cannot tell."""

    def __init__(self, stat: Path = Path("/proc/stat")) -> None:
        self.stat = stat
        self.cores = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
        self.busy_s = self.offered_s = self.foreign_s = self.own_offered_s = 0.0
        first = busy_s(stat)
        self.ok, self.cpus = first is not None, first[1] if first else 0
        self._start: tuple[float, float | None, float, float] | None = None

    def _read(self) -> tuple[float, float | None] | None:
        """(the host's busy seconds, its own cores'), from one read of /proc/stat."""
        per = busy_per_cpu(self.stat)
        host = _sum(per, None) if per else None
        own = _sum(per, self.cores) if per and self.cores else None
        return (host[0], own[0] if own else None) if host else None

    def __enter__(self) -> HostBusy:
        now = self._read() if self.ok else None
        self._start = (*now, time.process_time(), time.perf_counter()) if now else None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._start is None:
            return
        now, cpu, wall = self._read(), time.process_time(), time.perf_counter()
        (h0, c0, p0, w0), self._start = self._start, None
        if now is None:
            self.ok = False
            return
        self.busy_s += now[0] - h0
        self.offered_s += (wall - w0) * self.cpus
        if now[1] is not None and c0 is not None:
            self.foreign_s += max(0.0, (now[1] - c0) - (cpu - p0))
            self.own_offered_s += (wall - w0) * len(self.cores)

    @property
    def share(self) -> float | None:
        return self.busy_s / self.offered_s if self.ok and self.offered_s > 0 else None

    @property
    def foreign_share(self) -> float | None:
        return self.foreign_s / self.own_offered_s if self.ok and self.own_offered_s > 0 else None
