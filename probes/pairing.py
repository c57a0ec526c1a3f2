"""TEMPORARY round-robin schedule; replaced by the full pairing module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def round_robin(endpoints: Sequence[int]) -> list[list[tuple[int, int]]]:
    eps = list(endpoints)
    if len(eps) % 2:
        eps.append(-1)
    n = len(eps)
    rounds = []
    for _ in range(n - 1):
        pairs = [(eps[i], eps[n - 1 - i]) for i in range(n // 2)]
        rounds.append([(min(a, b), max(a, b)) for a, b in pairs if a >= 0 and b >= 0])
        eps = [eps[0], eps[-1], *eps[1:-1]]
    return rounds


def schedule(endpoints: Sequence[int], hosts: Mapping[int, str], pairing: str, seed: int) -> list[list[tuple[int, int]]]:
    return round_robin(endpoints)
