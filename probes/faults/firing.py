"""When a fault fires: the spec's `after`, `every`, `count`, `after_s` and `chance`, counted per fault over
the calls that match it (its op and dtype). One rule for every backend's injector (the torch path's
dispatch mode, the JAX and numpy paths' `jax_backend.Injector`), so a spec means the same chip on each."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

from .spec import EPOCH_ENV, Fault

CHANCE_DRAWS: dict[tuple[int, float], random.Random] = {}
HITS: Counter[Fault] = Counter()
"""The calls each fault has hit in this process, every injector together: a run's results say how often
their case was hit (`inject_hits`), so a fault no kernel ever matched is told from one that was caught."""


def chance_draw(f: Fault) -> float:
    """The next draw of the fault's intermittency generator: one per (seed, chance), for the whole
    process, so trials of the same op do not all draw alike."""
    rng = CHANCE_DRAWS.get((f.seed, f.chance))
    if rng is None:
        rng = CHANCE_DRAWS[(f.seed, f.chance)] = random.Random(f"repro-chance:{f.seed}")
    return rng.random()


class Firing:
    """One injector's call counters (per fault index), so faults are deterministic per call. `after_s`
    counts from the run's start (EPOCH_ENV, set by the launcher for its workers), else from now."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}
        self.epoch = float(os.environ.get(EPOCH_ENV) or time.time())

    def fire(self, f: Fault, i: int) -> int | None:
        """Count a call that matches fault number `i`; its call number when the fault hits it, None when
        the call is spared. Hang and crash act here."""
        if f.after_s and time.time() - self.epoch < f.after_s:
            return None
        n = self.calls.get(i, 0)
        self.calls[i] = n + 1
        if n < f.after or (n - f.after) % f.every or (f.count and n >= f.after + f.count * f.every):
            return None
        if f.chance < 1.0 and chance_draw(f) >= f.chance:
            return None
        HITS[f] += 1
        if f.kind == "hang":
            while True:
                time.sleep(3600)
        if f.kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        return n
