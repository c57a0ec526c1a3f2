"""Link pairing: rounds of disjoint pairs that cover what they promise, in O(N) rounds, reproducibly."""

from __future__ import annotations

import itertools

import pytest

from chipcheck.probes import pairing
from chipcheck.probes.pairing import PairingKind, PairingSpecError

SIZES = range(2, 41)


def _check_rounds(rounds: list[list[tuple[int, int]]], endpoints: list[int]) -> set[tuple[int, int]]:
    """Every round is disjoint, every pair ordered a < b and between known endpoints; returns the pairs."""
    members = set(endpoints)
    seen: set[tuple[int, int]] = set()
    for r in rounds:
        used = [e for p in r for e in p]
        assert len(used) == len(set(used)), f"round {r} reuses an endpoint"
        assert all(a < b and a in members and b in members for a, b in r)
        assert r, "empty round"
        seen.update(r)
    return seen


def _all_pairs(endpoints: list[int]) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for a, b in itertools.combinations(endpoints, 2)}


@pytest.mark.parametrize("n", SIZES)
def test_round_robin_covers_every_pair_once_in_n_minus_1_or_n_rounds(n: int) -> None:
    eps = list(range(n))
    rounds = pairing.round_robin(eps)
    assert len(rounds) == (n - 1 if n % 2 == 0 else n)
    pairs = [p for r in rounds for p in r]
    assert len(pairs) == len(set(pairs)) == n * (n - 1) // 2
    assert _check_rounds(rounds, eps) == _all_pairs(eps)
    if n % 2:  # one bye per round, every endpoint sits out exactly once
        byes = [set(eps) - {e for p in r for e in p} for r in rounds]
        assert all(len(b) == 1 for b in byes) and set().union(*byes) == set(eps)
    else:
        assert all(len(r) == n // 2 for r in rounds)


def test_round_robin_takes_any_ids_and_rejects_duplicates() -> None:
    eps = [40, 7, 13, 2, 99]
    assert _check_rounds(pairing.round_robin(eps), eps) == _all_pairs(eps)
    assert pairing.round_robin([3]) == [] and pairing.round_robin([]) == []
    with pytest.raises(ValueError, match="repeated"):
        pairing.round_robin([1, 2, 2])


@pytest.mark.parametrize("n", SIZES)
def test_random_matchings_are_perfect_distinct_and_deterministic(n: int) -> None:
    eps = list(range(100, 100 + n))
    full = n - 1 if n % 2 == 0 else n
    for seed in range(5):
        for k in (1, 3, 15):
            rounds = pairing.random_matchings(eps, k, seed)
            assert rounds == pairing.random_matchings(eps, k, seed)
            assert len(rounds) == k
            _check_rounds(rounds, eps)
            for r in rounds:  # perfect: everyone plays, but one bye when n is odd
                assert len(r) == n // 2
            pairs = [p for r in rounds for p in r]
            if k <= full:  # no repeat while an unused pair remains
                assert len(pairs) == len(set(pairs))
            else:
                assert set(pairs) == _all_pairs(eps)
            if n % 2 and k <= n:  # the bye rotates: nobody sits out twice
                byes = [(set(eps) - {e for p in r for e in p}).pop() for r in rounds]
                assert len(set(byes)) == len(byes)


def test_random_matchings_depend_on_the_seed_and_use_no_global_state() -> None:
    import random

    eps = list(range(32))
    a = pairing.random_matchings(eps, 5, seed=1)
    random.seed(12345)  # global state must not matter
    assert pairing.random_matchings(eps, 5, seed=1) == a
    assert pairing.random_matchings(eps, 5, seed=2) != a
    assert pairing.random_matchings(eps, 0, seed=1) == []
    with pytest.raises(ValueError):
        pairing.random_matchings(eps, -1, seed=1)


@pytest.mark.parametrize("n", SIZES)
def test_schedule_all_and_auto_cover_every_pair(n: int) -> None:
    eps = list(range(n))
    hosts = {e: f"node{e // 4}" for e in eps}
    for spec in ("all", "auto", " ALL "):
        rounds = pairing.schedule(eps, hosts, spec, seed=0)
        assert _check_rounds(rounds, eps) == _all_pairs(eps)
        assert len(rounds) <= n


@pytest.mark.parametrize("n", SIZES)
def test_schedule_random_always_covers_intra_host_pairs(n: int) -> None:
    eps = list(range(n))
    for per_host in (1, 3, 8):
        hosts = {e: f"node{e // per_host}" for e in eps}
        intra = {p for p in _all_pairs(eps) if hosts[p[0]] == hosts[p[1]]}
        for seed in range(3):
            rounds = pairing.schedule(eps, hosts, "random:3", seed)
            assert rounds == pairing.schedule(eps, hosts, "random:3", seed)
            pairs = [p for r in rounds for p in r]
            assert len(pairs) == len(set(pairs)), "a pair measured twice"
            covered = _check_rounds(rounds, eps)
            assert intra <= covered
            # O(N): the K matchings plus one host's round robin at most
            assert len(rounds) <= 3 + per_host


def test_schedule_intra_host_rounds_merge_hosts() -> None:
    eps = list(range(8))
    hosts = {e: f"node{e // 4}" for e in eps}  # two hosts of 4: 3 intra rounds, both hosts in each
    rounds = pairing.schedule(eps, hosts, "random:1", seed=0)
    assert len(rounds) <= 1 + 3
    extra = rounds[1:]
    assert any({hosts[a] for a, _ in r} == {"node0", "node1"} for r in extra)


def test_auto_switches_to_random_above_64() -> None:
    eps = list(range(80))
    hosts = {e: f"node{e // 8}" for e in eps}
    rounds = pairing.schedule(eps, hosts, "auto", seed=7)
    # 15 random matchings + at most 7 intra-host rounds, far fewer than the 79 of all pairs
    assert 15 <= len(rounds) <= 15 + 7
    _check_rounds(rounds, eps)
    assert len(pairing.schedule(list(range(64)), {e: "h" for e in range(64)}, "auto", 0)) == 63


def test_random_k_beyond_all_pairs_is_all_pairs() -> None:
    eps = list(range(6))
    hosts = dict.fromkeys(eps, "h")
    assert pairing.schedule(eps, hosts, "random:99", seed=0) == pairing.round_robin(eps)


@pytest.mark.parametrize("spec", ["", "some", "random", "random:", "random:0", "random:-2", "random:x", "rand:3",
                                  "all:3"])
def test_bad_pairing_spec_is_a_fix_it_error(spec: str) -> None:
    with pytest.raises(PairingSpecError, match="random:K") as info:
        pairing.schedule([0, 1], {0: "a", 1: "b"}, spec, seed=0)
    assert isinstance(info.value, ValueError)


def test_parse_pairing() -> None:
    assert pairing.parse_pairing("random:15") == pairing.PairingSpec(kind=PairingKind.RANDOM, k=15)
    assert pairing.parse_pairing("auto").kind is PairingKind.AUTO


def test_schedule_needs_a_host_for_every_endpoint() -> None:
    with pytest.raises(ValueError, match="no host label"):
        pairing.schedule([0, 1, 2], {0: "a", 1: "a"}, "all", seed=0)


@pytest.mark.parametrize("n", [5, 8, 17, 40])
def test_repair_pairs_every_suspect_with_distinct_known_good_partners(n: int) -> None:
    eps = list(range(n))
    for seed in range(5):
        suspects = {1}
        links = [(2, 3), (n - 1, 0)]
        targets = suspects | {2, 3, n - 1, 0}
        good = set(eps) - targets
        rounds = pairing.repair_rounds(suspects, links, good, eps, seed)
        assert rounds == pairing.repair_rounds(suspects, links, good, eps, seed)
        pairs = _check_rounds(rounds, eps)
        assert len([p for r in rounds for p in r]) == len(pairs)
        for t in targets:
            mates = {b if a == t else a for a, b in pairs if t in (a, b)}
            assert len(mates) == min(2, len(good)), (t, mates)
            assert mates <= good  # never a suspect, so never its original peer either
        assert all((a in targets) != (b in targets) for a, b in pairs)
        assert len(rounds) <= 2 * max(2, -(-2 * len(targets) // max(len(good), 1))) + 1


def test_repair_spreads_partners_over_the_known_good() -> None:
    eps = list(range(40))
    suspects = list(range(10))
    good = list(range(10, 40))
    rounds = pairing.repair_rounds(suspects, [], good, eps, seed=3, partners=3)
    load = {g: 0 for g in good}
    for r in rounds:
        for a, b in r:
            load[b if a in suspects else a] += 1
    assert max(load.values()) == 1  # 30 pairs over 30 known-good endpoints
    assert len(rounds) == 3


def test_repair_with_too_few_known_good_does_what_it_can() -> None:
    assert pairing.repair_rounds([0], [], [], [0, 1, 2], seed=0) == []
    rounds = pairing.repair_rounds([], [(0, 1)], [2], [0, 1, 2], seed=0)
    assert sorted(p for r in rounds for p in r) == [(0, 2), (1, 2)] and len(rounds) == 2
    with pytest.raises(ValueError, match="not among"):
        pairing.repair_rounds([7], [], [1], [0, 1, 2], seed=0)
