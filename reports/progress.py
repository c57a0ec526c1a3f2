"""Progress of a live run, one line per device: cases done / total, current probe, elapsed, failures so far.

Pure bookkeeping and text: the CLI feeds it the runner's `on_start` / `on_result` events and decides
where the lines go (redrawn in place on a terminal; `-v` and non-terminal output stream every case
instead, see `case_line`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..results import ProbeResult, Verdict


@dataclass(slots=True)
class DeviceProgress:
    """What one device has done so far."""

    label: str
    total: int | None = None
    """Cases planned for it (None when the plan is not known; retests can add a few more)."""
    done: int = 0
    failures: int = 0
    current: str = ""
    """The probe and case it is in now ('' between cases)."""
    finished: bool = False


@dataclass(slots=True)
class Progress:
    """Every device's progress in one run."""

    started: float
    devices: dict[int, DeviceProgress] = field(default_factory=dict)

    def device(self, rank: int, label: str = "") -> DeviceProgress:
        if rank not in self.devices:
            self.devices[rank] = DeviceProgress(label=label or f"rank {rank}")
        return self.devices[rank]

    def start(self, rank: int, probe: str, case: str) -> None:
        """A case began on `rank`."""
        self.device(rank).current = f"{probe} {case}"

    def result(self, r: ProbeResult) -> None:
        """A case ended on `r.rank` (any verdict; an error counts as a failure)."""
        d = self.device(r.rank, f"{r.host} {r.device}")
        if d.label.startswith("rank "):
            d.label = f"{r.host} {r.device}"
        d.done += 1
        d.failures += r.held is not Verdict.PASS  # a value its whole group shares is not yet its own
        d.current = ""
        if d.total is not None and d.done >= d.total:
            d.finished = True

    def lines(self, now: float, width: int = 120) -> list[str]:
        """One line per device, in rank order, each cut to `width` columns (so a redraw never wraps)."""
        out = []
        for rank in sorted(self.devices):
            d = self.devices[rank]
            total = "?" if d.total is None else str(max(d.total, d.done))
            bar = _bar(d.done, d.total)
            idle = "starting" if not d.done else "between cases"
            now_doing = "done" if d.finished and not d.current else (d.current or idle)
            fails = f"{d.failures} failing" if d.failures else "0 failing"
            line = (f"rank {rank:<3} {d.label:<18} {bar} {d.done:>4}/{total:<4} {_clock(now - self.started)}  "
                    f"{fails:<10}  {now_doing}")
            out.append(line[:width])
        return out


def _bar(done: int, total: int | None, width: int = 16) -> str:
    if not total:
        return "[" + " " * width + "]"
    filled = min(width, round(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _clock(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def case_line(n: int, r: ProbeResult) -> str:
    """The streamed line for the `n`th result (`-v`, and every non-terminal run): greppable, one per case.
    A local verdict that rests only on a value its whole group shares (a global loss every rank of a
    data-parallel step holds) reads `wrong (group)`: the judgement at the end says whose it is."""
    tf = r.metrics.get("tflops")
    speed = f"{tf:.3f} TFLOP/s" if tf is not None else ""
    verdict = r.verdict.value if r.held is r.verdict else f"{r.verdict.value} (group)"
    return f"[{n:>4}] rank {r.rank} {r.device} {r.probe} {r.case:<22} {verdict:<6} {speed}"
