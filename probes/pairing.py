"""Which endpoint pairs the links probe measures, scheduled as rounds of disjoint pairs.

A round is a list of disjoint unordered pairs (a, b) with a < b: no endpoint appears twice in a
round, so every pair of a round can run at once (a shared endpoint would split its bandwidth and
make both measurements look slow). The probe measures both directions of a pair inside its round,
so covering every unordered pair covers every ordered one.

- `all` (round_robin): every pair exactly once in N-1 rounds (N even) or N rounds (N odd);
- `random:K` (random_matchings): K seeded random perfect matchings, for fleets where N^2 pairs
  cost too much; every endpoint still meets K partners, which is enough to localize a bad end;
- intra-host pairs are always all measured: they are few and that is where NVLink/xGMI faults live;
- repair_rounds: the second pass that re-pairs the ends of failed links with known-good partners,
  so the bad end can be told from its innocent peer.

Pure functions: no torch, no I/O; every random choice comes from `random.Random(seed)`.
"""

from __future__ import annotations

import enum
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Pair = tuple[int, int]
Round = list[Pair]

AUTO_ALL_PAIRS_MAX = 64
"""`auto` measures all pairs up to this many endpoints (64 endpoints: 63 rounds)."""
AUTO_RANDOM_K = 15
"""Random matchings `auto` uses above AUTO_ALL_PAIRS_MAX (15 rounds, whatever the fleet size)."""


class PairingSpecError(ValueError):
    """A `--pairing` value that is not `all`, `auto` or `random:K`."""


class PairingKind(enum.StrEnum):
    ALL = "all"
    RANDOM = "random"
    AUTO = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class PairingSpec:
    """A parsed `--pairing` value."""

    kind: PairingKind
    k: int = 0
    """Number of random matchings (only for `random`)."""


_RANDOM_RE = re.compile(r"random:(\d+)")


def parse_pairing(text: str) -> PairingSpec:
    """Parse `all` | `auto` | `random:K` (K >= 1); anything else raises PairingSpecError with a fix-it."""
    s = text.strip().lower()
    if s in (PairingKind.ALL, PairingKind.AUTO):
        return PairingSpec(kind=PairingKind(s))
    m = _RANDOM_RE.fullmatch(s)
    if m and int(m.group(1)) >= 1:
        return PairingSpec(kind=PairingKind.RANDOM, k=int(m.group(1)))
    raise PairingSpecError(
        f"invalid pairing {text!r}: use 'all' (every pair), 'random:K' with K a positive integer "
        f"(K random matchings, e.g. 'random:{AUTO_RANDOM_K}') or 'auto' (all pairs up to "
        f"{AUTO_ALL_PAIRS_MAX} endpoints, random:{AUTO_RANDOM_K} above)")


def _unique(endpoints: Iterable[int]) -> list[int]:
    eps = list(endpoints)
    if len(set(eps)) != len(eps):
        dup = sorted({e for e in eps if eps.count(e) > 1})
        raise ValueError(f"endpoints must be distinct; repeated: {dup}")
    return eps


def _pair(a: int, b: int) -> Pair:
    return (a, b) if a < b else (b, a)


def round_robin(endpoints: Sequence[int]) -> list[Round]:
    """Every unordered pair exactly once, as rounds of disjoint pairs (the circle method).

    N-1 rounds for even N; for odd N a phantom endpoint is added and its partner sits the round
    out, giving N rounds with one bye each (every endpoint gets exactly one bye).
    """
    eps = _unique(endpoints)
    if len(eps) < 2:
        return []
    circle: list[int | None] = [*eps, None] if len(eps) % 2 else list(eps)
    m = len(circle)
    rounds: list[Round] = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = circle[i], circle[m - 1 - i]
            if a is not None and b is not None:
                pairs.append(_pair(a, b))
        rounds.append(sorted(pairs))
        # the first seat stays; everyone else moves one seat round the circle
        circle = [circle[0], circle[-1], *circle[1:-1]]
    return rounds


def random_matchings(endpoints: Sequence[int], k: int, seed: int) -> list[Round]:
    """K seeded random perfect matchings (odd N: one bye per round, rotating), deterministic per seed.

    Each matching is a round of a round-robin tournament over a random relabelling of the
    endpoints, in random order: each round alone is a uniformly random perfect matching, no pair
    repeats until every pair has been used (K > N-1), byes rotate (no endpoint sits out twice
    before everyone sat out once), and no retry loop is needed. Past one tournament's worth of
    rounds a new relabelled tournament starts (repeats are then unavoidable).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    eps = _unique(endpoints)
    if len(eps) < 2:
        return []
    rng = random.Random(seed)
    rounds: list[Round] = []
    while len(rounds) < k:
        order = list(eps)
        rng.shuffle(order)
        tournament = round_robin(order)
        rng.shuffle(tournament)
        rounds.extend(tournament[: k - len(rounds)])
    return rounds


def pack_rounds(pairs: Iterable[Pair]) -> list[Round]:
    """Pack pairs into rounds of disjoint pairs, first fit in the given order (at most 2*degree-1 rounds)."""
    rounds: list[Round] = []
    busy: list[set[int]] = []
    for a, b in pairs:
        for r, used in zip(rounds, busy, strict=True):
            if a not in used and b not in used:
                r.append(_pair(a, b))
                used.update((a, b))
                break
        else:
            rounds.append([_pair(a, b)])
            busy.append({a, b})
    return [sorted(r) for r in rounds]


def repair_rounds(suspects: Iterable[int], suspect_links: Iterable[Pair], known_good: Iterable[int],
                  endpoints: Sequence[int], seed: int, partners: int = 2) -> list[Round]:
    """The second pass: pair each suspect end with `partners` distinct known-good endpoints.

    Suspects are every failed endpoint plus both ends of every failed link. A suspect is never
    paired with its peer on a failed link, nor with another suspect: a failure then implicates
    only the suspect (the partner is known good), and a pass clears it. Partners are spread over
    the known-good endpoints (least used first, ties broken by the seed) so the rounds stay few.
    A suspect gets fewer partners when fewer known-good endpoints are available (none: no pairs).
    """
    if partners < 1:
        raise ValueError(f"partners must be >= 1, got {partners}")
    members = set(_unique(endpoints))
    peers: dict[int, set[int]] = defaultdict(set)
    for a, b in suspect_links:
        peers[a].add(b)
        peers[b].add(a)
    targets = sorted(set(suspects) | set(peers))
    good = sorted(set(known_good) - set(targets))
    unknown = sorted(e for e in [*targets, *good] if e not in members)
    if unknown:
        raise ValueError(f"endpoints {unknown} are not among the scheduled endpoints")
    rng = random.Random(seed)
    load = dict.fromkeys(good, 0)
    pairs: list[Pair] = []
    for t in targets:
        choices = [g for g in good if g not in peers[t]]
        rng.shuffle(choices)
        choices.sort(key=load.__getitem__)  # stable: least loaded first, seeded order among equals
        for g in choices[:partners]:
            pairs.append(_pair(t, g))
            load[g] += 1
    return pack_rounds(pairs)


def _intra_host_rounds(endpoints: Sequence[int], hosts: Mapping[int, str]) -> list[Round]:
    """All intra-host pairs: a round robin per host, the hosts' i-th rounds merged into one round."""
    by_host: dict[str, list[int]] = defaultdict(list)
    for e in endpoints:
        by_host[hosts[e]].append(e)
    merged: list[Round] = []
    for members in by_host.values():
        for i, r in enumerate(round_robin(members)):
            if i == len(merged):
                merged.append([])
            merged[i].extend(r)  # hosts are disjoint, so their pairs never share an endpoint
    return [sorted(r) for r in merged]


def schedule(endpoints: Sequence[int], hosts: Mapping[int, str], pairing: str, seed: int) -> list[Round]:
    """The links probe's schedule: `pairing` (`all` | `random:K` | `auto`) plus every intra-host pair.

    `auto` is `all` up to AUTO_ALL_PAIRS_MAX endpoints and `random:AUTO_RANDOM_K` above. A
    `random:K` asking for at least as many rounds as `all` needs becomes `all` (every pair, no
    repeats, no more rounds). Intra-host pairs not already covered are added as extra rounds.
    Raises PairingSpecError for a bad `pairing`, ValueError for an endpoint without a host.
    """
    spec = parse_pairing(pairing)
    eps = _unique(endpoints)
    missing = [e for e in eps if e not in hosts]
    if missing:
        raise ValueError(f"no host label for endpoints {missing}: give every endpoint its host")
    kind = spec.kind
    if kind is PairingKind.AUTO:
        kind = PairingKind.ALL if len(eps) <= AUTO_ALL_PAIRS_MAX else PairingKind.RANDOM
    k = spec.k if spec.kind is PairingKind.RANDOM else AUTO_RANDOM_K
    full_rounds = len(eps) - 1 if len(eps) % 2 == 0 else len(eps)
    if kind is PairingKind.ALL or k >= full_rounds:
        return round_robin(eps)
    rounds = random_matchings(eps, k, seed)
    covered = {p for r in rounds for p in r}
    for r in _intra_host_rounds(eps, hosts):
        extra = [p for p in r if p not in covered]
        if extra:
            rounds.append(extra)
    return rounds
