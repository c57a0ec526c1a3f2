"""Each device against its peers (the others of its fingerprint), in O(n log n) per group."""

from __future__ import annotations

import numpy as np


def _loo_median(s: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Median of the sorted array `s` without its element at each index in `pos` (exact, O(1) each).

    The remaining n-1 values in order are s[k] for k < pos and s[k+1] after it, so the middle
    one(s) are read straight from `s`.
    """
    m = len(s) - 1

    def kth(k: int) -> np.ndarray:
        return np.where(k < pos, s[k], s[np.minimum(k + 1, len(s) - 1)])

    return kth(m // 2) if m % 2 else (kth(m // 2 - 1) + kth(m // 2)) / 2


def peer_ratios(v: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Per device: its value / the median of its peers (the others), and whether it is a robust low outlier.

    Exactly what comparing each device with the list of all the others gives, in O(n log n) instead of
    O(n^2): the leave-one-out median takes at most three distinct values, so the peers' absolute
    deviations are sorted once per distinct median and their leave-one-out median read the same way.
    """
    order = np.argsort(v, kind="stable")
    s = v[order]
    pos = np.empty(len(v), dtype=np.int64)
    pos[order] = np.arange(len(v))
    med = _loo_median(s, pos)
    ratio = v / med
    flag = np.ones(len(v), dtype=bool)
    if len(v) - 1 < 4:  # too few peers for a spread: the ratio alone decides
        return ratio, flag
    mad = np.empty(len(v))
    for mu in np.unique(med):
        idx = np.nonzero(med == mu)[0]
        dev = np.abs(v - mu)
        dev_sorted = np.sort(dev)
        # removing any element equal to this device's deviation leaves the same multiset
        mad[idx] = _loo_median(dev_sorted, np.searchsorted(dev_sorted, dev[idx]))
    with np.errstate(divide="ignore", invalid="ignore"):
        zscore = np.where(mad > 0, (med - v) / (1.4826 * mad), np.where(v < med, np.inf, 0.0))
    return ratio, zscore >= z
