"""Intermittent failures, with statistics: how many trials find one, and how sure the evidence is.

A marginal chip fails the same op on the same inputs in k of n trials, not every time. A reproducer
for it must run enough trials to see it (`plan`), and the vendor must be told how strong the
evidence is, chip against chip (`Evidence`: failed k1 of n1 trials on the suspect, k2 of n2 on the
reference, and the one-sided p-value of Fisher's exact test that the suspect fails no more often
than the reference).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DETECTION = 0.999
"""The probability with which a planned number of trials sees a failure at the measured rate."""
MEASURE = 24
"""Trials run to measure a failure's rate (a 25% fault shows in all but 1 in 1,000 such series)."""
MAX_TRIALS = 200
"""A plan never asks for more (a rate below ~3.4% would; say so instead of running for ever)."""


def plan(k: int, n: int, detection: float = DETECTION) -> int:
    """Trials that see at least one failure with probability `detection` at the rate k/n (k of n
    trials failed); 1 for a failure that showed every time. The rate is taken at its lower 95%
    bound for small n's sake (Wilson), so a lucky series does not plan too few trials."""
    if n <= 0 or k <= 0:
        raise ValueError("a plan needs a failure that showed at least once (k >= 1 of n >= 1)")
    if k >= n:
        return 1
    p = max(wilson_low(k, n), 1e-9)
    return min(MAX_TRIALS, max(1, math.ceil(math.log(1.0 - detection) / math.log1p(-p))))


def wilson_low(k: int, n: int, z: float = 1.96) -> float:
    """Lower bound of the Wilson score interval for a rate seen k times in n trials."""
    phat = k / n
    den = 1 + z * z / n
    centre = phat + z * z / (2 * n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / den)


def fisher_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p of Fisher's exact test: how likely failures split at least this unevenly toward
    the first device (k1 of n1) if both devices failed at the same rate (k2 of n2 on the second)."""
    total, fails = n1 + n2, k1 + k2
    denom = math.comb(total, fails)
    hi = min(fails, n1)
    return min(1.0, sum(math.comb(n1, x) * math.comb(n2, fails - x) for x in range(k1, hi + 1)) / denom)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """How often a case failed on one device: `failed` of `trials`."""

    device: str
    failed: int
    trials: int

    @property
    def intermittent(self) -> bool:
        return 0 < self.failed < self.trials

    @property
    def plan(self) -> int:
        """Trials a reproducer runs by default (1 for a failure that shows every time)."""
        return plan(self.failed, self.trials) if self.failed else 1

    def line(self) -> str:
        if not self.intermittent:
            return f"failed {self.failed} of {self.trials} trials on {self.device}"
        return (f"intermittent: failed {self.failed} of {self.trials} trials on {self.device}; {self.plan} runs "
                f"see it with {DETECTION:.1%} probability at that rate (its lower 95% bound)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """Trials chip against chip."""

    suspect: str
    failed: int
    trials: int
    reference: str
    ref_failed: int
    ref_trials: int

    @property
    def p(self) -> float:
        return fisher_greater(self.failed, self.trials, self.ref_failed, self.ref_trials)

    def line(self) -> str:
        return (f"failed {self.failed} of {self.trials} trials on {self.suspect}; {self.ref_failed} of "
                f"{self.ref_trials} on {self.reference}; p = {self.p:.2g} (Fisher's exact test, one-sided)")


_COUNT = re.compile(r"(\d+) of (\d+) runs wrong")


def counted(line: str) -> tuple[int, int] | None:
    """(k, n) from repro.py's last line ("REPRODUCED: 3 of 25 runs wrong ..."), None when absent."""
    m = _COUNT.search(line)
    return (int(m.group(1)), int(m.group(2))) if m else None
