"""Which mismatches a case keeps, and what it writes on them: one policy, declared by each probe.

A case can see the same fault many times (every repeat, burn iteration or backend). It keeps the
first mismatch of each identity (its oracle; with `by_tensor` also its tensor; with `by_backend` also
the backend that produced it) and stamps on it where it first appeared. A later one of the same
identity is either dropped or added to the kept one (its bit histogram, and one tally).

Each probe declares its `KeepPolicy` as a module constant and calls `keep`. While the case runs, the
tallies are typed state on `CaseOutcome.kept` (never read back out of a note); the kept `Mismatch`
is rendered again from them after each addition, in the note text stored results and reports hold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

from ..results import Mismatch


class Stamp(Enum):
    """What the kept (first) mismatch's note says about where it appeared."""

    NONE = "none"
    FIRST_REPEAT = "first_repeat"
    """Appended: `first_repeat=R` (the repeat, or round, it came from)."""
    FIRST_BAD_ITERATION = "first_bad_iteration"
    """Appended: `first_bad_iteration=I first_bad_s=T` (the iteration, and seconds into the run)."""


class Tally(Enum):
    """What a kept mismatch counts of the later ones of its identity, shown at the end of its note."""

    NONE = "none"
    ROUNDS = "bad_rounds"
    """`bad_rounds=N`: the rounds it was seen in, the first included (shown from the first on)."""
    LATER_BAD_ELEMENTS = "later_repeats_bad_elements"
    """`later_repeats_bad_elements=N`: the bad elements of every later one (shown once one came)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepPolicy:
    """How one probe keeps its mismatches (module constant; `keep` applies it)."""

    by_tensor: bool = False
    """Identity includes the tensor (otherwise: the oracle alone)."""
    by_backend: bool = False
    """Identity includes the backend passed to `keep`; a mismatch with none (between backends) is
    always kept: each such comparison runs once per case."""
    histogram: bool = False
    """A later mismatch adds its bit histogram to the kept one's."""
    tally: Tally = Tally.NONE
    stamp: Stamp = Stamp.NONE


@dataclass(slots=True)
class Kept:
    """One kept mismatch while its case runs: its identity and its tallies, typed."""

    shown: Mismatch
    """The mismatch as it stands in `CaseOutcome.mismatches` (found there by identity, `is`)."""
    note: str
    """Its note when it was kept (stamped): what every later rendering starts from."""
    backend: str | None = None
    rounds: int = 1
    later_bad_elements: int = 0


class CaseOutcome(Protocol):
    """What `keep` needs of a case's outcome (probes.base.CaseOutcome, which imports this module)."""

    mismatches: list[Mismatch]
    kept: list[Kept]


def keep(out: CaseOutcome, m: Mismatch, policy: KeepPolicy, *, repeat: int | None = None,
         iteration: int | None = None, seconds: float | None = None, backend: str | None = None) -> None:
    """Keep `m` in `out` as `policy` says: the first of its identity, stamped with where it appeared
    (`repeat`, or `iteration` and `seconds`), or add it to the one already kept."""
    for i, old in enumerate(out.mismatches):
        if old.oracle is not m.oracle or (policy.by_tensor and old.tensor != m.tensor):
            continue
        kept = _kept(out, old)
        if policy.by_backend and (backend is None or kept is None or kept.backend != backend):
            continue
        if policy.histogram or policy.tally is not Tally.NONE:
            _add(out, i, kept or _adopt(out, old), m, policy)
        return
    note = _stamped(m, policy, repeat, iteration, seconds)
    shown = replace(m, note=f"{note} {Tally.ROUNDS.value}=1".strip() if policy.tally is Tally.ROUNDS else note)
    out.mismatches.append(shown)
    out.kept.append(Kept(shown=shown, note=note, backend=backend))


def _stamped(m: Mismatch, policy: KeepPolicy, repeat: int | None, iteration: int | None,
             seconds: float | None) -> str:
    stamp = policy.stamp
    if stamp is Stamp.NONE:
        return m.note
    if stamp is Stamp.FIRST_BAD_ITERATION:
        if iteration is None or seconds is None:
            raise ValueError("keep: this policy stamps the iteration: pass iteration= and seconds=")
        return (m.note + f" first_bad_iteration={iteration} first_bad_s={seconds:.3f}").strip()
    if repeat is None:
        raise ValueError("keep: this policy stamps the repeat: pass repeat=")
    return (m.note + f" first_repeat={repeat}").strip()


def _kept(out: CaseOutcome, shown: Mismatch) -> Kept | None:
    return next((k for k in out.kept if k.shown is shown), None)


def _adopt(out: CaseOutcome, shown: Mismatch) -> Kept:
    """A mismatch the probe put in `out` itself: tallied from here on, as if kept with its note."""
    kept = Kept(shown=shown, note=shown.note)
    out.kept.append(kept)
    return kept


def _add(out: CaseOutcome, i: int, kept: Kept, m: Mismatch, policy: KeepPolicy) -> None:
    """Add the later `m` to the kept mismatch at `out.mismatches[i]`, and render it again."""
    old = out.mismatches[i]
    hist = old.bit_histogram
    if policy.histogram:
        hist = dict(hist)
        for b, c in m.bit_histogram.items():
            hist[b] = hist.get(b, 0) + c
    note = old.note
    if policy.tally is Tally.ROUNDS:
        kept.rounds += 1
        # the stored text: the kept note's words, single-spaced, then the count
        words = [w for w in kept.note.split() if not w.startswith(f"{Tally.ROUNDS.value}=")]
        note = " ".join(words) + f" {Tally.ROUNDS.value}={kept.rounds}"
    elif policy.tally is Tally.LATER_BAD_ELEMENTS:
        kept.later_bad_elements += m.bad_elements
        # the stored text: the kept note's key=value words only (a repeated key once, its last
        # value, where it first stood), then the count
        pairs = dict(w.split("=", 1) for w in kept.note.split() if "=" in w)
        pairs[Tally.LATER_BAD_ELEMENTS.value] = str(kept.later_bad_elements)
        note = " ".join(f"{k}={v}" for k, v in pairs.items())
    kept.shown = out.mismatches[i] = replace(old, bit_histogram=hist, note=note)
