"""Topology from latency: which endpoints share a host, a rack, a building.

Average-linkage clustering of the measured latency matrix, cut where merge heights jump, gives
levels such as host, rack, building; compared with what the user declared. Pure functions over
the links judge's matrices (fleet/judge/links.py); no torch, no I/O.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class InferredTopology:
    """Levels found in the latency matrix; level 0 is the outermost (coarsest)."""

    levels: tuple[str, ...]
    """Level names, outermost first: ("rack", "host"); names are guesses from the level count."""
    groups: list[tuple[int, ...]]
    """Per endpoint, its group id at each level (ids numbered in order of their smallest endpoint)."""
    merge_heights: list[float]
    """Every finite merge height of the dendrogram (microseconds), ascending."""
    cuts: tuple[float, ...] = ()
    """The height each level was cut at, outermost first: endpoints closer than it share a group."""


_LEVEL_NAMES = ("building", "rack", "host")


def _symmetrize(latency: Sequence[Sequence[float | None]]) -> np.ndarray:
    n = len(latency)
    m = np.full((n, n), np.nan)
    for i, row in enumerate(latency):
        if len(row) != n:
            raise ValueError(f"latency matrix must be square: row {i} has {len(row)} entries, expected {n}")
        for j, v in enumerate(row):
            if v is not None and i != j:
                m[i, j] = v
    # the mean of both directions; the one measured alone when only one was
    count = (~np.isnan(m)).astype(float) + (~np.isnan(m.T))
    total = np.nan_to_num(m) + np.nan_to_num(m.T)
    out = np.full((n, n), np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def average_linkage(dist: np.ndarray) -> list[tuple[int, int, float]]:
    """Agglomerative clustering, average linkage over the *measured* pairs (NaN = unmeasured).

    Returns merges (a, b, height) in order, cluster ids as in scipy (leaves 0..n-1, merge k makes
    n+k). With a complete matrix this is UPGMA (scipy's `average`); with gaps (random pairing
    measures only K partners per endpoint) the distance of two clusters is the mean over the pairs
    between them that were measured, which scipy cannot do. Clusters with no measured pair
    between them never merge. O(n^2) memory; a nearest-neighbour cache keeps time near O(n^2).
    """
    n = dist.shape[0]
    known = ~np.isnan(dist)
    np.fill_diagonal(known, False)
    total = np.where(known, dist, 0.0)
    count = known.astype(np.int64)
    ids = list(range(n))
    active = np.ones(n, dtype=bool)

    def row(i: int) -> np.ndarray:
        r = np.full(n, np.inf)
        ok = (count[i] > 0) & active
        ok[i] = False
        np.divide(total[i], count[i], out=r, where=ok)
        return r

    def nearest(i: int) -> tuple[float, int]:
        r = row(i)
        j = int(np.argmin(r))
        return float(r[j]), j

    near_d = np.full(n, np.inf)
    near_j = np.zeros(n, dtype=np.int64)
    for i in range(n):
        near_d[i], near_j[i] = nearest(i)
    merges: list[tuple[int, int, float]] = []
    for _ in range(n - 1):
        masked = np.where(active, near_d, np.inf)
        i = int(np.argmin(masked))
        if not math.isfinite(masked[i]):
            break  # what is left was never measured against each other
        j = int(near_j[i])
        i, j = min(i, j), max(i, j)
        merges.append((min(ids[i], ids[j]), max(ids[i], ids[j]), float(masked[i])))
        total[i] += total[j]
        count[i] += count[j]
        total[:, i], count[:, i] = total[i], count[i]
        active[j] = False
        near_d[j] = np.inf
        ids[i] = n + len(merges) - 1
        new = row(i)
        # rows whose nearest was i or j must look again (the merged cluster may be farther away);
        # the others only need to know whether the merged cluster is nearer than their nearest
        stale = np.flatnonzero(active & ((near_j == i) | (near_j == j)))
        for k in stale:
            near_d[k], near_j[k] = nearest(int(k))
        closer = active & (new < near_d)
        near_d[closer], near_j[closer] = new[closer], i
        near_d[i], near_j[i] = nearest(i)
    return merges


def _cut_heights(heights: list[float], max_levels: int, jump: float) -> list[float]:
    """Cut heights between consecutive merge heights that jump by more than `jump` x (the largest jumps)."""
    hs = sorted(heights)
    cands = []
    for lo, hi in zip(hs, hs[1:], strict=False):
        ratio = hi / lo if lo > 0 else (math.inf if hi > 0 else 1.0)
        if ratio > jump:
            cands.append((ratio, math.sqrt(lo * hi) if lo > 0 else hi / 2))
    cands.sort(key=lambda c: -c[0])
    return sorted((c for _, c in cands[:max_levels]), reverse=True)


def _cut(merges: list[tuple[int, int, float]], heights: list[float], n: int, cut: float) -> list[int]:
    """Group id per endpoint after applying every merge at or below `cut` (ids by smallest endpoint)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    leaf = list(range(n))  # one leaf of each dendrogram node, to union by
    for (a, b, _), h in zip(merges, heights, strict=True):
        leaf.append(leaf[a])
        if h <= cut:
            parent[find(leaf[b])] = find(leaf[a])
    ids: dict[int, int] = {}
    return [ids.setdefault(find(e), len(ids)) for e in range(n)]


def infer_topology(latency: Sequence[Sequence[float | None]], max_levels: int = 3,
                   jump: float = 2.0) -> InferredTopology:
    """Topology levels from an N x N latency matrix (None = unmeasured; both directions averaged).

    Average-linkage clustering, then the dendrogram is cut where consecutive merge heights jump by
    more than `jump` (2x): latency comes in tiers (NVLink within a host, one switch within a rack,
    more hops across racks), so merges within a tier sit close together and the tiers are far
    apart. The `max_levels` largest jumps become levels, outermost first. No jump: no levels.
    With sparse pairing (random:K) a group is only found where its members were measured against
    each other: a host with no measured link into the rest of its rack stays a group of its own at
    the rack level (at random:15 this starts around 2000 endpoints in 64-endpoint racks).
    """
    d = _symmetrize(latency)
    n = d.shape[0]
    merges = average_linkage(d) if n else []
    # with gaps a merge can come out lower than an earlier one; lifting it to its children's height
    # keeps the tree monotone, so one height cuts it cleanly
    eff: list[float] = []
    node_h = [0.0] * n
    for a, b, h in merges:
        node_h.append(max(h, node_h[a], node_h[b]))
        eff.append(node_h[-1])
    cuts = _cut_heights(eff, max_levels, jump) if max_levels > 0 else []
    groups: list[list[int]] = [[] for _ in range(n)]
    for cut in cuts:
        for e, gid in enumerate(_cut(merges, eff, n, cut)):
            groups[e].append(gid)
    k = len(cuts)
    names = _LEVEL_NAMES[-k:] if 0 < k <= len(_LEVEL_NAMES) else tuple(f"L{i + 1}" for i in range(k))
    return InferredTopology(levels=tuple(names), groups=[tuple(g) for g in groups],
                            merge_heights=sorted(eff), cuts=tuple(cuts))


def render_topology(t: InferredTopology, labels: Mapping[int, str]) -> str:
    """An indented text tree: one line per group, the finest groups listing their endpoints."""
    n = len(t.groups)
    head = (f"topology from latency: {' > '.join(f'{lv} (< {c:.3g} us)' for lv, c in zip(t.levels, t.cuts, strict=False))}"
            if t.levels else "topology from latency: no levels (no jump in latency between endpoints)")
    lines = [f"{head}; {n} endpoints"]

    def name(e: int) -> str:
        return labels.get(e, str(e))

    def walk(members: list[int], level: int, indent: str) -> None:
        if level == len(t.levels):
            lines.append(f"{indent}{', '.join(name(e) for e in members)}")
            return
        by: dict[int, list[int]] = defaultdict(list)
        for e in members:
            by[t.groups[e][level]].append(e)
        for gid in sorted(by):
            sub = by[gid]
            if level == len(t.levels) - 1:
                lines.append(f"{indent}{t.levels[level]} {gid}: {', '.join(name(e) for e in sub)}")
            else:
                lines.append(f"{indent}{t.levels[level]} {gid} ({len(sub)} endpoints)")
                walk(sub, level + 1, indent + "  ")

    walk(list(range(n)), 0, "  " if t.levels else "  all: ")
    return "\n".join(lines)


def _few(es: Iterable[int], limit: int = 8) -> str:
    es = sorted(es)
    text = ", ".join(map(str, es[:limit]))
    return text + (f" (+{len(es) - limit} more)" if len(es) > limit else "")


def compare_declared(t: InferredTopology, declared: Mapping[int, tuple[str, ...]]) -> list[str]:
    """One line per disagreement between declared labels (outermost first, e.g. (rack, host)) and `t`.

    Levels are aligned from the finest (declared host vs measured finest level, then the next
    coarser of each while both have one); a declared level is the label prefix, so host names may
    repeat across racks. Within a level each measured group belongs to the declared label most of
    its members carry, and each label lives in the group holding most of its members:
    - endpoints in a group owned by another label, away from most of their own: mislabeled;
    - a group holding most of two labels: declared apart but measured together;
    - a label owning several groups: declared together but measured apart.
    """
    eps = sorted(e for e in declared if 0 <= e < len(t.groups))
    if not t.levels:
        places = {declared[e] for e in eps}
        if len(places) > 1:
            return [f"latency shows no structure, but the {len(eps)} endpoints are declared in "
                    f"{len(places)} distinct places"]
        return []
    depth = min(len(t.levels), min((len(declared[e]) for e in eps), default=0))
    lines: list[str] = []
    for j in range(depth):
        mlev = len(t.levels) - 1 - j
        level = t.levels[mlev]
        label = {e: declared[e][: len(declared[e]) - j] for e in eps}
        group = {e: t.groups[e][mlev] for e in eps}
        members: dict[int, list[int]] = defaultdict(list)
        where: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for e in eps:
            members[group[e]].append(e)
            where[label[e]].append(e)
        owner = {g: _mode(label[e] for e in ms) for g, ms in members.items()}
        home = {lab: _mode(group[e] for e in ms) for lab, ms in where.items()}
        strays: dict[tuple[tuple[str, ...], int], list[int]] = defaultdict(list)
        merged: set[tuple[int, tuple[str, ...]]] = set()
        for e in eps:
            g, lab = group[e], label[e]
            if owner[g] == lab:
                continue
            if home[lab] == g:
                merged.add((g, lab))
            else:
                strays[(lab, g)].append(e)
        for (lab, g), es in sorted(strays.items()):
            who = f"endpoint {es[0]}" if len(es) == 1 else f"endpoints {_few(es)}"
            own = [x for x in where[lab] if x not in es]
            mates = [x for x in members[g] if label[x] == owner[g]]
            lines.append(f"{who}: declared {level} {lab[-1]!r} (with {_few(own) or 'no one'}) but "
                         f"measure{'s' if len(es) == 1 else ''} with {_few(mates)} (declared {level} "
                         f"{owner[g][-1]!r})")
        for g, lab in sorted(merged):
            lines.append(f"declared {level}s {owner[g][-1]!r} and {lab[-1]!r} are measured as one {level}: "
                         f"endpoints {_few(members[g])}")
        for lab, ms in sorted(where.items()):
            owned = sorted(g for g, o in owner.items() if o == lab)
            if len(owned) > 1:
                parts = "; ".join(_few(x for x in ms if group[x] == g) for g in owned)
                lines.append(f"declared {level} {lab[-1]!r} is measured as {len(owned)} separate groups: {parts}")
    return lines


def _mode(items: Iterable[Any]) -> Any:
    """Most common item; ties go to the smallest, so the answer does not depend on input order."""
    counts = Counter(items)
    best = max(counts.values())
    return min(k for k, c in counts.items() if c == best)
