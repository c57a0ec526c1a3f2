"""Trends over a device's (or a link's) own history: pure functions, no I/O.

- throughput fell: a change point in the device's speed series (its throughput divided by its
  fingerprint peers' median in each run, so a fleet-wide driver change or a hot night moves no
  one). The series is split in two where the mean shift is largest against the series' own
  noise (a two-segment CUSUM / t-statistic scan); a drop is reported only when the shift is both
  significant (`z`) and large (`min_drop`), and the *medians* of the two segments confirm it:
  one noisy run can move a mean but not a median of several runs.
- turned flaky: flaky in at least `flaky_k` of the last `flaky_n` runs after a clean past.
- lemon: wrong in at least `lemon_k` of the last `lemon_n` runs (a chip whose corruption recurs).
- link slower: the same change-point test over a link's bandwidth (normalised by each run's median).

The scan is vectorised over devices (one row per device, one column per run, NaN where the device
was not in the run) so 100,000 devices x 365 runs take seconds, in chunks that bound memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# MAD of first differences -> sigma of the series: diff of two iid N(0, s) is N(0, s*sqrt2), MAD = 0.6745 sigma
_DIFF_MAD_TO_SIGMA = 1.0 / (0.6745 * np.sqrt(2.0))
_CHUNK = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class TrendPolicy:
    min_drop: float = 0.10
    """Relative fall of the level that counts (0.10 = the device got 10% slower)."""
    z: float = 6.0
    """Significance of the mean shift against the series' own noise (t-statistic of the best split)."""
    min_segment: int = 3
    """Runs needed on each side of a change point: a single bad night is not a trend."""
    noise_floor: float = 0.002
    """Relative noise assumed at least (perfectly flat synthetic series would otherwise divide by zero)."""
    flaky_k: int = 2
    flaky_n: int = 5
    flaky_base_rate: float = 0.1
    """A device 'turned' flaky only if at most this fraction of its earlier runs were flaky."""
    lemon_k: int = 2
    lemon_n: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangePoint:
    index: int
    """Position (in the series given) of the first run at the new level."""
    before: float
    """Median level before the change."""
    after: float
    """Median level from the change on."""
    score: float
    """The shift's t-statistic against the series' noise."""

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else float("nan")


def drops(matrix: np.ndarray, policy: TrendPolicy = TrendPolicy()) -> dict[int, ChangePoint]:
    """Rows of `matrix` (devices x runs, NaN = absent) whose level fell; row -> its change point."""
    out: dict[int, ChangePoint] = {}
    x = np.asarray(matrix, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2 * policy.min_segment:
        return out
    for lo in range(0, x.shape[0], _CHUNK):
        for row, cp in _drops_chunk(x[lo:lo + _CHUNK], policy).items():
            out[lo + row] = cp
    return out


def change_point(series: Sequence[float | None], policy: TrendPolicy = TrendPolicy()) -> ChangePoint | None:
    """The drop in one series (None entries: runs the device missed), or None."""
    row = np.array([[np.nan if v is None else float(v) for v in series]], dtype=np.float64)
    return drops(row, policy).get(0)


def _drops_chunk(x: np.ndarray, policy: TrendPolicy) -> dict[int, ChangePoint]:
    valid = ~np.isnan(x)
    cnt = np.cumsum(valid, axis=1)
    tot = np.cumsum(np.where(valid, x, 0.0), axis=1)
    n_all, s_all = cnt[:, -1:], tot[:, -1:]
    # split after column k: before = [0..k], after = [k+1..]
    nb, sb = cnt[:, :-1], tot[:, :-1]
    na, sa = n_all - nb, s_all - sb
    with np.errstate(invalid="ignore", divide="ignore"):
        mb, ma = sb / nb, sa / na
        level = s_all[:, 0] / n_all[:, 0]  # only scales the noise floor: the mean is good enough
        sigma = _noise(x) * _DIFF_MAD_TO_SIGMA
        sigma = np.fmax(sigma, policy.noise_floor * np.abs(level))[:, None]
        t = (mb - ma) / (sigma * np.sqrt(1.0 / nb + 1.0 / na))
    # a split must leave min_segment real runs on each side, and only a split at a present run counts
    ok = (nb >= policy.min_segment) & (na >= policy.min_segment) & valid[:, 1:]
    t = np.where(ok & np.isfinite(t), t, -np.inf)
    best = np.argmax(t, axis=1)
    score = t[np.arange(len(x)), best]
    ratio = ma[np.arange(len(x)), best] / mb[np.arange(len(x)), best]
    out: dict[int, ChangePoint] = {}
    for row in np.nonzero((score >= policy.z) & (ratio <= 1.0 - policy.min_drop))[0]:
        k = int(best[row]) + 1
        before, after = x[row, :k], x[row, k:]
        b, a = float(np.nanmedian(before)), float(np.nanmedian(after))
        if b > 0 and a / b <= 1.0 - policy.min_drop:  # medians confirm what the means suggest
            out[int(row)] = ChangePoint(index=k, before=b, after=a, score=float(score[row]))
    return out


def _noise(x: np.ndarray) -> np.ndarray:
    """Per row, the median absolute difference between consecutive runs (gaps skipped).

    Differences are blind to a level shift (one large difference among many), so the noise is
    measured the same with or without the change being looked for.
    """
    d = np.abs(np.diff(x, axis=1))
    if not np.isnan(d).any():
        return np.median(d, axis=1)  # the dense case (every device in every run): a partition, no sort
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with fewer than two present runs: NaN
        return np.nanmedian(d, axis=1)


def flags_matrix(flags: np.ndarray, policy: TrendPolicy = TrendPolicy()) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (flaky, wrong) flags (devices x runs x 2; absent runs False): whether the device
    turned flaky (flaky in >= flaky_k of the last flaky_n runs, after a past of >= flaky_n runs that was
    mostly clean), and its lemon count (how many of the last lemon_n runs were wrong when that
    reaches lemon_k, else 0)."""
    flaky, wrong = flags[..., 0].astype(np.int32), flags[..., 1].astype(np.int32)
    n = flags.shape[1]
    recent = flaky[:, -policy.flaky_n:].sum(axis=1)
    past = flaky[:, :-policy.flaky_n].sum(axis=1) if n > policy.flaky_n else np.zeros(len(flags), np.int32)
    turned = (n >= 2 * policy.flaky_n) & (recent >= policy.flaky_k) & \
        (past <= policy.flaky_base_rate * max(n - policy.flaky_n, 0))
    k = wrong[:, -policy.lemon_n:].sum(axis=1)
    return turned, np.where(k >= policy.lemon_k, k, 0)
