"""Collectives: exact patterns that decode to the guilty rank, nccl-tests bandwidth, lost peers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import device, probe_of, run_json

from chipcheck.probes.collectives import (
    EXACT_LIMIT,
    Code,
    CollectiveStep,
    Group,
    blame,
    bus_factor,
    localize,
    offset_pairs,
    pair_verdict,
)
from chipcheck.results import Blame


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
@pytest.mark.parametrize("n", [2, 3, 4, 7, 8, 16, 33, 64])
def test_sum_patterns_stay_exact(dtype: str, n: int) -> None:
    c = Code.for_sum(n, dtype)
    top = n * (c.g_mod - 1) + 2 ** min(n, c.rank_bits) - 1
    assert top < EXACT_LIMIT[dtype] and c.g_mod >= 1


def test_bus_factors_are_nccl_tests() -> None:
    assert bus_factor("all_reduce_sum", 8) == 2 * 7 / 8
    assert bus_factor("all_gather", 4) == bus_factor("reduce_scatter", 4) == bus_factor("all_to_all", 4) == 0.75
    assert bus_factor("broadcast", 4) == bus_factor("sendrecv_ring", 4) == 1.0


def _ring(n: int) -> list[tuple[int, int]]:
    return offset_pairs(n, 1)


@pytest.mark.parametrize(("n", "failed", "named"), [
    (4, {1, 2}, [2]),  # (1, 2) and (2, 3) failed: every pair holding rank 2, and no other
    (3, {2, 0}, [0]),  # (2, 0) and (0, 1)
    (4, set(), []),  # nothing failed: nobody
    (4, {1}, []),  # one pair alone (an intermittent fault, or the link between them): nobody
    (3, {0, 1, 2}, []),  # every pair: not one chip's fault, nor can the pairs say whose
    (5, {0, 1, 2}, [1, 2]),  # (0, 1), (1, 2), (2, 3): two bad chips side by side, each beside a cleared one
])
def test_ring_pairs_name_a_rank_only_when_every_pair_holding_it_fails_and_no_other(n: int, failed: set[int],
                                                                                named: list[int]) -> None:
    assert _ring(n)[-1] == (n - 1, 0)
    v = pair_verdict(n, _ring(n), failed)
    assert v.named == named
    assert f"(ring pairs of {n} ranks)" in v.why


def test_pairs_clear_only_ranks_that_passed_and_nobody_when_they_contradict_themselves() -> None:
    v = pair_verdict(4, _ring(4), {1, 2})
    assert v.cleared == {0, 1, 3} and not v.undecided
    v = pair_verdict(4, _ring(4), {1})  # (1, 2) failed, though both passed elsewhere: clears nobody
    assert v.named == [] and v.cleared == frozenset() and "not one chip's fault" in v.why
    v = pair_verdict(4, _ring(4), {0, 1, 2, 3})  # two bad chips a rank apart (0 and 2, or 1 and 3)
    assert v.named == [] and v.undecided == {0, 1, 2, 3} and v.cleared == frozenset()
    pairs = _ring(4) + offset_pairs(4, 2)  # (0, 2) and (1, 3) as well: only (1, 3) passes
    assert pairs[4:] == [(0, 2), (1, 3)]
    v = pair_verdict(4, pairs, {0, 1, 2, 3, 4})
    assert v.named == [0, 2] and v.cleared == {1, 3} and not v.undecided


class _Pairs(Group):
    """A group whose pair re-runs fail exactly where a pair holds one of `bad` (a fault that stays with its chip)."""

    def __init__(self, n: int, bad: set[int]):
        self.n, self.bad, self.asked = n, bad, []

    def run_pairs(self, step: CollectiveStep, pairs: list[tuple[int, int]]) -> list[bool] | None:
        self.asked.append(pairs)
        return [bool(self.bad & set(p)) for p in pairs]


@pytest.mark.parametrize(("n", "bad", "rounds"), [
    (4, {2}, 1), (8, {5}, 1), (5, {1, 2}, 1),  # the ring pairs say it
    (4, {0, 2}, 2), (6, {1, 3}, 2), (8, {0, 2, 4}, 2),  # every ring pair between them fails: (k, k+2) too
    (8, {0, 3}, 1),  # apart by more than one: each has a cleared neighbour
])
def test_localize_names_every_bad_chip_and_runs_wider_pairs_only_while_ranks_are_undecided(
        n: int, bad: set[int], rounds: int) -> None:
    g = _Pairs(n, bad)
    v = localize(g, [_step("all_reduce_sum", n=n)])
    assert v.named == sorted(bad) and v.cleared == set(range(n)) - bad
    assert len(g.asked) == rounds


class _SometimesPairs(_Pairs):
    """Rank 2's fault shows in pair (1, 2) only some of the time: its first run there passes (or every
    max run, where rank 2's corrupted element does not win)."""

    def __init__(self, n: int, bad: set[int], hide_max: bool = False):
        super().__init__(n, bad)
        self.hide_max, self.ops = hide_max, []

    def run_pairs(self, step: CollectiveStep, pairs: list[tuple[int, int]]) -> list[bool] | None:
        self.asked.append(pairs)
        self.ops.append(step.op)
        hidden = len(self.asked) == 1 or (self.hide_max and step.op == "all_reduce_max")
        return [bool(self.bad & set(p)) and not (hidden and p == (1, 2)) for p in pairs]


def test_a_pair_failed_when_it_failed_in_any_of_the_case_s_runs() -> None:
    """One run alone: (1, 2) passed, so rank 2 was cleared and its partner 3 named by (2, 3). The case's
    runs together: every ring pair failed, and (0, 2) / (1, 3) name 0 and 2."""
    alone = localize(_SometimesPairs(4, {0, 2}), [_step("all_reduce_sum", n=4)])
    assert alone.named == [0, 3]  # the false name one data-dependent pass gives
    v = localize(_SometimesPairs(4, {0, 2}), [_step("all_reduce_sum", n=4), _step("all_reduce_sum", n=4)])
    assert v.named == [0, 2] and v.cleared == {1, 3}


def test_a_max_is_re_run_in_pairs_as_a_sum_too() -> None:
    """A rank that corrupts what it sends into a max shows only where its value wins: its max pairs can
    all pass. The pairs also sum, which shows every contribution (found from outside: two bad ranks of
    four, the healthy rank 3 named flaky in every max case)."""
    g = _SometimesPairs(4, {0, 2}, hide_max=True)
    g.asked.append([])  # no first-run pass: only the max hides rank 2
    v = localize(g, [_step("all_reduce_max", n=4)])
    assert v.named == [0, 2] and v.cleared == {1, 3}
    assert g.ops == ["all_reduce_max", "all_reduce_sum"] * 2


class _RootPairs(_Pairs):
    """A broadcast pair fails only where its root (the pair's `step.root`-th rank) is bad: a bad rank that
    is not the root sends nothing."""

    def run_pairs(self, step: CollectiveStep, pairs: list[tuple[int, int]]) -> list[bool] | None:
        self.asked.append(pairs)
        return [p[step.root] in self.bad for p in pairs]


@pytest.mark.parametrize(("n", "bad"), [(4, {0, 2}), (3, {0}), (5, {3})])
def test_a_broadcast_is_re_run_in_pairs_from_each_end(n: int, bad: set[int]) -> None:
    """From one end only, a bad rank that is not its pair's root passes that pair and is cleared, and
    the root of a failed pair beside it is named instead (or the pairs contradict themselves)."""
    v = localize(_RootPairs(n, bad), [_step("broadcast", n=n)])
    assert v.named == sorted(bad) and v.cleared == set(range(n)) - bad


def test_a_backend_without_pair_re_runs_names_nobody() -> None:
    v = localize(Group(), [_step("all_reduce_sum", n=4)])
    assert v.named == [] and v.cleared == frozenset()


def test_decoding_never_names_a_rank_a_pair_cleared() -> None:
    """A bit flipped in a sum mimics a missing contribution: decoding would name a healthy rank. Once a
    pair re-run cleared it, its name is dropped; the observers it leaves share the evidence."""
    s = _step("all_reduce_sum", n=4, r=3)
    s.buf = s.expected().clone()
    s.buf[5] -= 2**1  # reads as rank 1's contribution missing
    m = s.check()
    assert m is not None and s.suspects(m) == [1]
    views = [(True, [1])] * 4
    kept, _ = blame(1, m, views, tensor="all_reduce_sum", count=64)
    assert kept is not None  # without pairs, decoding names rank 1
    kept, observed = blame(1, m, views, tensor="all_reduce_sum", count=64, cleared=frozenset({1, 3}))
    assert kept is None and "a pair re-run of the op cleared this rank" in observed
    kept, _ = blame(0, m, views, tensor="all_reduce_sum", count=64, cleared=frozenset({1, 3}))
    assert kept is not None and kept.blame == Blame.SHARED and kept.group == [0, 2]


def test_an_undecodable_bad_shard_of_a_reduction_is_every_contributors_not_its_holders_alone() -> None:
    """`--backend jax` with `bitflip:rank=2,bit=20,dtype=float32,every=2,scope=process`: rank 2's
    contribution to one reduce_scatter shard was corrupted, the pair re-runs (every 2nd call) saw nothing,
    and the shard's holder, rank 1, was the whole group of the shared evidence: healthy rank 1 `suspect`."""
    s = _step("reduce_scatter", n=4, r=1)
    s.buf = s.expected().clone()
    s.buf[0] += 0.5  # a corrupted contribution, not a missing one: no source decodable
    m = s.check()
    assert m is not None and s.suspects(m) == []
    views = [(False, []), (True, []), (False, []), (False, [])]
    kept, _ = blame(1, m, views, tensor="reduce_scatter", count=s.count)
    assert kept is not None and kept.blame == Blame.SHARED and kept.group == [0, 1, 2, 3]
    kept, _ = blame(1, m, views, tensor="reduce_scatter", count=s.count, cleared=frozenset({0}))
    assert kept is not None and kept.group == [1, 2, 3]
    # a copy's bad chunk has one source: its observers alone, as before
    kept, _ = blame(1, m, views, tensor="all_to_all", count=s.count)
    assert kept is not None and kept.group == [1]


def _step(op: str, n: int = 4, r: int = 1, dtype: str = "float32") -> CollectiveStep:
    s = CollectiveStep(op=op, n=n, r=r, count=64, dtype=dtype, tdt=getattr(torch, dtype), device=torch.device("cpu"))
    s.init()
    return s


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_a_missing_contribution_names_its_rank(dtype: str) -> None:
    s = _step("all_reduce_sum", dtype=dtype)
    s.buf = s.expected().clone()
    s.buf[5] -= 2**2  # rank 2's contribution never arrived at element 5
    m = s.check()
    assert m is not None and m.first_indices == [[5]]
    assert s.suspects(m) == [2] and "missing the contribution of rank(s) [2]" in m.note


def test_a_misrouted_chunk_decodes_to_its_source() -> None:
    s = _step("all_gather")
    s.buf = s.expected().clone()
    s.buf[16 * 3 + 2] = s.buf[16 * 0 + 2]  # chunk 3 holds rank 0's element
    m = s.check()
    assert m is not None and s.suspects(m) == [3]
    assert "holds rank 0's elem 2; expected rank 3's" in m.note


def test_max_decodes_the_winner() -> None:
    s = _step("all_reduce_max", n=4)
    s.buf = s.expected().clone()
    s.buf[1] = s.buf[1] - s.code.g_mod  # a value from the next rank down won
    m = s.check()
    assert m is not None and "max came from rank" in m.note


def test_clean_collectives_pass_with_bandwidth(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, "--probes", "collectives", "--devices", "cpu:3", "--min-gap", "0.9")
    assert rc == 0, out
    for d in data["devices"]:
        (p,) = d["probes"]
        assert p["verdict"] == "pass"
        assert len(p["details"]["cases"]) == 21
        assert all(p["metrics"][f"{c['case']}:busbw_gbps"] > 0 for c in p["details"]["cases"])


@pytest.mark.parametrize("bad", [2, 1])  # 1: the pairs holding it are (0, 1), (1, 2); (2, 0) must pass
def test_corrupted_payload_blames_the_sender_only(tmp_path: Path, bad: int) -> None:
    rc, data, out = run_json(tmp_path, "--probes", "collectives", "--devices", "cpu:3", "--min-gap", "0.9", "--inject",
                             f"bitflip:rank={bad},bit=3,op=_allgather_base_")
    assert rc == 1, out
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {r: "wrong" if r == bad else "pass" for r in range(3)}
    (p0,) = device(data, 0 if bad else 1)["probes"]
    seen = [c for c in p0["details"]["cases"] if c["case"].startswith("all_gather")]
    assert all(f"rank(s) [{bad}]" in " ".join(c["params"]["observed"]) for c in seen)


def test_a_rank_lost_mid_collective_is_named(tmp_path: Path) -> None:
    rc, data, out = run_json(tmp_path, "--probes", "collectives", "--devices", "cpu:3", "--timeout", "60",
                             "--inject", "crash:rank=1,op=allreduce_")
    assert rc == 1, out
    # only the lost rank is an error: what the others could not run is not held against them (issue 20)
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "error", 2: "pass"}
    lost = probe_of(data, 1, "collectives")["details"]["cases"][0]["error"]
    assert lost["kind"] == "crash" and "signal 9" in lost["message"]
    for r in (0, 2):
        other = probe_of(data, r, "collectives")["details"]["cases"]
        assert all(c["error"]["kind"] == "peer_lost" and "peer rank 1 lost" in c["error"]["message"]
                   for c in other)
        assert len(other) == 21  # every case is accounted for


@pytest.mark.parametrize(("devices", "bad", "spec", "op"), [
    ("cpu:3", 0, "bitflip:rank=0,bit=20,op=broadcast_,scope=process", "broadcast/"),
    ("cpu:4", 1, "bitflip:rank=1,bit=4,op=send,scope=process", "sendrecv_ring/"),
    # what rank 2 receives in the ring: the injector once waited inside the batch's recv and deadlocked it
    ("cpu:4", 2, "bitflip:rank=2,bit=3,op=recv_,side=recv,scope=process", "sendrecv_ring/"),
])
def test_a_rank_named_by_the_pair_re_run_is_the_only_one_named(tmp_path: Path, devices: str, bad: int, spec: str,
                                                                op: str) -> None:
    # The ring pairs' re-run once passed group-local ranks where c10d takes global ones (broadcast's src,
    # the ring's peers: raised in pair (1, 2), every device `error`) and placed pair (n-1, 0) as listed,
    # not in its group's ascending order (its healthy re-run failed)
    rc, data, out = run_json(tmp_path, "--probes", "collectives", "--devices", devices, "--min-gap", "0.9", "--inject",
                             spec)
    assert rc == 1, out
    n = int(devices.partition(":")[2])
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {r: "wrong" if r == bad else "pass" for r in range(n)}
    wrong = [c for c in probe_of(data, bad, "collectives")["details"]["cases"] if c["verdict"] == "wrong"]
    assert wrong and all(c["case"].startswith(op) for c in wrong)
    held = [p for p in [(k, (k + 1) % n) for k in range(n)] if bad in p]
    assert all(f"pair tests name rank {bad}: the op failed in pairs {held}" in
               c["mismatches"][0]["note"] for c in wrong), [c["mismatches"][0]["note"][:200] for c in wrong]


def test_two_bad_ranks_a_rank_apart_are_both_named_and_no_other(tmp_path: Path) -> None:
    """Rank 0 corrupts what it receives in all-reduces, rank 2 what it sends. Every ring pair holds one of
    them, so the ring pairs named nobody and the sums' decoding (a flipped bit reads as a missing
    contribution) named the healthy rank 1 `flaky` and missed rank 2; one max pair run that hid rank 2's
    corruption named rank 3. Found from outside, with every default probe."""
    rc, data, out = run_json(tmp_path, "--probes", "collectives", "--devices", "cpu:4", "--min-gap", "0.9", "--inject",
                             "bitflip:rank=0,bit=3,op=allreduce_,side=recv,scope=process;"
                             "bitflip:rank=2,bit=3,op=allreduce_,scope=process")
    assert rc == 1, out
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "wrong", 1: "pass", 2: "wrong", 3: "pass"}
    wrong = [c for c in probe_of(data, 2, "collectives")["details"]["cases"] if c["verdict"] == "wrong"]
    assert wrong and all(c["case"].startswith("all_reduce_sum/") for c in wrong)
    assert "pair tests name rank 2" in wrong[0]["mismatches"][0]["note"]


def test_a_reduce_scatter_receive_fault_lands_and_names_the_receiver(tmp_path: Path) -> None:
    """Gloo's reduce-scatter delivers its result with its own copy at the caller's wait: a receive fault
    applied when the op returned was overwritten and the faulty rank passed (a user-level sweep of every
    op, send and receive side, on cpu:4 found it). The fault now lands on what arrives, whichever copy
    delivers it, and only the receiver is named."""
    rc, data, out = run_json(tmp_path, "--probes", "collectives", "--devices", "cpu:3", "--min-gap", "0.9", "--inject",
                             "bitflip:rank=1,bit=3,op=_reduce_scatter_base_,side=recv,scope=process")
    assert rc == 1, out
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "wrong", 2: "pass"}
    wrong = [c["case"] for c in probe_of(data, 1, "collectives")["details"]["cases"] if c["verdict"] == "wrong"]
    assert wrong and all(c.startswith("reduce_scatter/") for c in wrong)
