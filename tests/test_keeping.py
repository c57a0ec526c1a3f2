"""probes.keeping: the one policy every probe keeps its mismatches by (issue 17).

The notes asserted here are the texts stored results have always held (the per-probe keepers this
module replaced wrote them): a kept mismatch must render exactly so.
"""

from __future__ import annotations

import pytest

from chipcheck.probes import attention, burn, collectives, matmul
from chipcheck.probes.base import CaseOutcome
from chipcheck.probes.keeping import KeepPolicy, Stamp, Tally, keep
from chipcheck.probes.model_step import step
from chipcheck.results import Mismatch, Oracle


def _m(oracle: Oracle = Oracle.EXACT, tensor: str = "C", bad: int = 1, hist: dict[int, int] | None = None,
       note: str = "") -> Mismatch:
    return Mismatch(oracle=oracle, tensor=tensor, bad_elements=bad, total_elements=64, bit_histogram=hist or {},
                    note=note)


def _out() -> CaseOutcome:
    return CaseOutcome(case="c", params={})


# ---- first only ----------------------------------------------------------------------------


def test_the_first_per_oracle_is_kept_and_later_ones_dropped() -> None:
    out = _out()
    first = _m(bad=3, note="a=1")
    keep(out, first, KeepPolicy())
    keep(out, _m(tensor="D", bad=9, note="b=2"), KeepPolicy())
    keep(out, _m(Oracle.REPEAT, bad=5), KeepPolicy())
    assert out.mismatches == [first, _m(Oracle.REPEAT, bad=5)]


def test_identity_by_tensor() -> None:
    out = _out()
    for t in ("C", "D", "C"):
        keep(out, _m(tensor=t), KeepPolicy(by_tensor=True))
    assert [m.tensor for m in out.mismatches] == ["C", "D"]


def test_identity_by_backend_and_none_is_always_kept() -> None:
    policy = KeepPolicy(by_tensor=True, by_backend=True)
    out = _out()
    for b in ("flash", "math", "flash", None, None):
        keep(out, _m(note=f"from={b}"), policy, backend=b)
    assert [m.note for m in out.mismatches] == ["from=flash", "from=math", "from=None", "from=None"]
    assert [k.backend for k in out.kept] == ["flash", "math", None, None]


def test_a_mismatch_put_there_by_the_probe_counts_as_kept() -> None:
    out = _out()
    out.mismatches.append(_m(note="on the warm-up call"))
    keep(out, _m(note="later"), KeepPolicy())
    assert [m.note for m in out.mismatches] == ["on the warm-up call"]


def test_an_insert_before_a_kept_one_does_not_lose_its_tallies() -> None:
    policy = KeepPolicy(histogram=True, tally=Tally.ROUNDS)
    out = _out()
    keep(out, _m(hist={3: 1}, note="n=1"), policy)
    out.mismatches.insert(0, _m(Oracle.NONFINITE, note="inserted"))
    keep(out, _m(hist={3: 2}), policy)
    assert out.mismatches[0].note == "inserted"
    assert out.mismatches[1].bit_histogram == {3: 3}
    assert out.mismatches[1].note == "n=1 bad_rounds=2"


# ---- accumulation ----------------------------------------------------------------------------


def test_histograms_add_up_in_the_order_bits_first_appeared() -> None:
    out = _out()
    for h in ({5: 1, 2: 1}, {2: 4, 9: 1}):
        keep(out, _m(hist=h), KeepPolicy(histogram=True))
    (m,) = out.mismatches
    assert list(m.bit_histogram.items()) == [(5, 1), (2, 5), (9, 1)]
    assert m.bad_elements == 1 and m.note == ""  # nothing else changes without a tally


def test_bad_rounds_are_counted_typed_and_rendered() -> None:
    policy = KeepPolicy(by_tensor=True, tally=Tally.ROUNDS, stamp=Stamp.FIRST_REPEAT)
    out = _out()
    keep(out, _m(note="backend=math  sigmas=12"), policy, repeat=1)
    assert out.mismatches[0].note == "backend=math  sigmas=12 first_repeat=1 bad_rounds=1"
    for r in (2, 3):
        keep(out, _m(note="ignored=1"), policy, repeat=r)
    assert out.kept[0].rounds == 3
    # from the first addition on: its words single-spaced, then the count
    assert out.mismatches[0].note == "backend=math sigmas=12 first_repeat=1 bad_rounds=3"


def test_later_bad_elements_are_counted_typed_and_rendered() -> None:
    policy = KeepPolicy(histogram=True, tally=Tally.LATER_BAD_ELEMENTS, stamp=Stamp.FIRST_REPEAT)
    out = _out()
    keep(out, _m(bad=7, note="sigmas=12 plain words a=1 a=2"), policy, repeat=0)
    assert out.mismatches[0].note == "sigmas=12 plain words a=1 a=2 first_repeat=0"
    keep(out, _m(bad=4), policy, repeat=1)
    keep(out, _m(bad=5), policy, repeat=2)
    assert out.kept[0].later_bad_elements == 9
    assert out.mismatches[0].bad_elements == 7
    # key=value words only, a repeated key once with its last value, then the count
    assert out.mismatches[0].note == "sigmas=12 a=2 first_repeat=0 later_repeats_bad_elements=9"


def test_a_kept_note_is_never_read_back() -> None:
    # the tallies live on CaseOutcome.kept: a later mismatch's own note text changes nothing
    policy = KeepPolicy(tally=Tally.ROUNDS)
    out = _out()
    keep(out, _m(note="n=1"), policy)
    keep(out, _m(note="bad_rounds=40"), policy)
    assert out.mismatches[0].note == "n=1 bad_rounds=2"


# ---- stamping --------------------------------------------------------------------------------


def test_stamps() -> None:
    out = _out()
    keep(out, _m(note="x=1"), KeepPolicy(stamp=Stamp.FIRST_REPEAT), repeat=2)
    keep(out, _m(Oracle.NONFINITE), KeepPolicy(stamp=Stamp.FIRST_BAD_ITERATION), iteration=17, seconds=2.71828)
    assert [m.note for m in out.mismatches] == ["x=1 first_repeat=2", "first_bad_iteration=17 first_bad_s=2.718"]


def test_only_the_first_is_stamped() -> None:
    out = _out()
    for r in range(3):
        keep(out, _m(), KeepPolicy(tally=Tally.LATER_BAD_ELEMENTS, stamp=Stamp.FIRST_REPEAT), repeat=r)
    assert out.mismatches[0].note == "first_repeat=0 later_repeats_bad_elements=2"


@pytest.mark.parametrize(("stamp", "where"), [(Stamp.FIRST_REPEAT, {}), (Stamp.FIRST_BAD_ITERATION, {"iteration": 1})])
def test_a_stamp_needs_its_where(stamp: Stamp, where: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="pass"):
        keep(_out(), _m(), KeepPolicy(stamp=stamp), **where)


# ---- the probes' policies ----------------------------------------------------------------------


def test_the_probes_declare_their_policies() -> None:
    assert matmul.KEEP == KeepPolicy(histogram=True, tally=Tally.LATER_BAD_ELEMENTS, stamp=Stamp.FIRST_REPEAT)
    assert step.KEEP == KeepPolicy(stamp=Stamp.FIRST_REPEAT)
    assert attention.KEEP == KeepPolicy(by_tensor=True, by_backend=True, histogram=True, tally=Tally.ROUNDS,
                                        stamp=Stamp.FIRST_REPEAT)
    assert burn.KEEP == KeepPolicy(by_tensor=True, stamp=Stamp.FIRST_BAD_ITERATION)
    assert collectives.KEEP == KeepPolicy(by_tensor=True)


def test_torch_attention_keeps_per_backend_and_tags_it() -> None:
    out = _out()
    attention._torch_keep(out, _m(tensor="dq", hist={1: 1}, note="sigmas=12"), "math", 0)
    attention._torch_keep(out, _m(tensor="dq", hist={1: 2}, note="sigmas=12"), "flash", 1)
    attention._torch_keep(out, _m(tensor="dq", hist={2: 1}, note="sigmas=12"), "math", 2)
    attention._torch_keep(out, _m(Oracle.CROSS_BACKEND, tensor="dq", note="cross_backend=flash_vs_math"), None, 0)
    assert [(m.note, m.bit_histogram) for m in out.mismatches] == [
        ("backend=math sigmas=12 first_repeat=0 bad_rounds=2", {1: 1, 2: 1}),
        ("backend=flash sigmas=12 first_repeat=1 bad_rounds=1", {1: 2}),
        ("cross_backend=flash_vs_math first_repeat=0 bad_rounds=1", {}),
    ]
