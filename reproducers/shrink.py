"""Shrink a failing capture to the smallest case that still fails the same way.

Hypothesis-style (its internal/conjecture/shrinking/): a `Shrinker` holds the current best case,
`consider()` tries a candidate only when it is simpler in shortlex order and not tried before (a
cache), passes are re-run until none makes progress, and a stall limit bounds the work;
`find_integer` probes exponentially then binary-searches. `ddmin` minimises a list.

Pipeline for a capture (`shrink_capture`):
1. differential replay on the suspect vs the reference names the first divergent op;
2. that op alone, on the suspect's recorded inputs, k-of-n times: most silent corruption ends here;
3. the op's inputs are shrunk (all dimensions of one size halved together, values simplified to
   zeros / ones / small seeded integers) while the signature (class, top flipped bit, device) holds.
When the op does not fail alone, the failure needs history (`shrink_history`): every earlier op is cut
at its recorded inputs, suffix bisection finds the shortest failing suffix, and ddmin (dead ops first)
keeps the few the failure needs; the target's inputs are then kept as recorded.
Collectives (several ranks) go through `shrink_collective`: the all-reduce, all-gather, reduce-scatter,
broadcast, all-to-all or send/recv that differs from its exact host-side result becomes a case with every
rank's input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from . import format as fmt
from . import group_check, trials
from . import replay as rp
from . import settings as st

T = TypeVar("T")


class NotReproducible(RuntimeError):
    """The capture (or case) does not fail on the suspect: nothing to shrink (exit 2)."""


# --- generic machinery ------------------------------------------------------------------------

def find_integer(f: Callable[[int], bool]) -> int:
    """The largest n >= 0 with f(n) true, assuming f(0) is true and f is monotone enough:
    probe 1, 2, 4, ... until it fails, then binary search (Hypothesis's find_integer)."""
    lo = 0
    for i in range(1, 5):  # small values one by one: most shrinks move a little
        if not f(i):
            return i - 1
        lo = i
    hi = lo * 2
    while f(hi):
        lo, hi = hi, hi * 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if f(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(slots=True)
class Shrinker(Generic[T]):
    """Greedy shrinker over cases of type T.

    `fails(case)` is the (expensive) test; `key(case)` orders cases (smaller is simpler: shortlex);
    `ident(case)` is a hashable identity for the cache.
    """

    current: T
    fails: Callable[[T], bool]
    key: Callable[[T], Any]
    ident: Callable[[T], Hashable]
    max_stall: int = 200
    calls: int = 0
    cache: dict[Hashable, bool] = field(default_factory=dict)
    stall: int = 0

    def consider(self, case: T) -> bool:
        """Accept `case` as the new best when it is simpler and still fails."""
        if not self.key(case) < self.key(self.current):
            return False
        ident = self.ident(case)
        if ident in self.cache:
            ok = self.cache[ident]
        else:
            if self.stall >= self.max_stall:
                return False
            self.calls += 1
            ok = self.cache[ident] = bool(self.fails(case))
        if ok:
            self.current = case
            self.stall = 0
        else:
            self.stall += 1
        return ok

    def run(self, passes: Sequence[Callable[[Shrinker[T]], None]]) -> T:
        """Re-run every pass until a full round makes no progress (or the stall limit is hit)."""
        while True:
            before = self.key(self.current)
            for p in passes:
                p(self)
            if not self.key(self.current) < before or self.stall >= self.max_stall:
                return self.current


def ddmin(items: list[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """Zeller's delta debugging: a 1-minimal sublist of `items` (order kept) that still fails."""
    cache: dict[tuple[int, ...], bool] = {}
    idx = list(range(len(items)))

    def test(sub: list[int]) -> bool:
        k = tuple(sub)
        if k not in cache:
            cache[k] = bool(fails([items[i] for i in sub]))
        return cache[k]

    n = 2
    while len(idx) >= 2:
        size = len(idx) // n
        chunks = [idx[i:i + size] for i in range(0, len(idx), size)] if size else [[i] for i in idx]
        progress = False
        for c in chunks:  # a chunk alone
            if test(c):
                idx, n, progress = c, 2, True
                break
        if not progress:
            for c in chunks:  # everything but a chunk
                rest = [i for i in idx if i not in c]
                if rest and test(rest):
                    idx, n, progress = rest, max(n - 1, 2), True
                    break
        if not progress:
            if n >= len(idx):
                break
            n = min(len(idx), 2 * n)
    return [items[i] for i in idx]


# --- the single-op case -----------------------------------------------------------------------

VALUE_KINDS = ("zeros", "ones", "ints", "data")
"""Input recipes, simplest first: a recipe regenerates from a seed; `data` is the recorded bytes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Input:
    """One tensor input of the case: a slice of recorded data, or a recipe."""

    kind: str
    shape: tuple[int, ...]
    dtype: str
    data: Any = field(default=None, compare=False, repr=False)
    """Host tensor (kind == data): the suspect's recorded input, sliced to `shape`."""
    seed: int = 0
    order: tuple[int, ...] | None = None
    """The dims' order in memory as the op was given them (`fmt.dims_in_memory`); None: row-major."""

    def make(self, device: str) -> torch.Tensor:
        dt = getattr(torch, self.dtype)
        if self.kind == "zeros":
            t = torch.zeros(self.shape, dtype=dt, device=device)
        elif self.kind == "ones":
            t = torch.ones(self.shape, dtype=dt, device=device)
        elif self.kind == "ints":
            t = torch.from_numpy(small_ints(self.shape, self.seed)).to(device=device, dtype=dt)
        else:
            t = self.data.to(device)
        return fmt.laid_out(t, self.order)

    def ident(self) -> tuple[Any, ...]:
        return (self.kind, self.shape, self.dtype, self.seed, self.order)


def small_ints(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Integers in [-4, 4] from numpy's PCG64 (stable across versions: repro.py regenerates them)."""
    return np.random.default_rng(seed).integers(-4, 5, size=shape).astype(np.float64)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpCase:
    """One op with concrete inputs: the unit the vendor receives."""

    op: str
    args: list[Any]
    """Recorded JSON args; tensors as {"in": k} (index into `inputs`)."""
    kwargs: dict[str, Any]
    inputs: tuple[Input, ...]
    output: int = 0

    def key(self) -> tuple[int, int, int, int]:
        return (sum(int(np.prod(i.shape)) for i in self.inputs),
                sum(VALUE_KINDS.index(i.kind) for i in self.inputs), sum(i.seed for i in self.inputs),
                sum(i.order is not None for i in self.inputs))

    def ident(self) -> tuple[Any, ...]:
        return tuple(i.ident() for i in self.inputs)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """One run of a case on the suspect against the reference."""

    metric: rp.Metric | None
    repeats: int
    failed: int


@dataclass(slots=True, kw_only=True)
class Target:
    """Where and how a case runs: the suspect device, the reference and the simulated fault."""

    device: str
    reference: str
    faults: list[Any] | None = None
    repeats: int = 3
    runs: int = 0
    settings: dict[str, Any] | None = None
    """The bit-changing settings the case runs under (reproducers/settings.py); None: the process's own."""

    def run(self, case: OpCase) -> Outcome:
        """k-of-n: the case on the suspect `repeats` times (stopping at the first failure)."""
        ref_dev, upcast = rp.parse_reference(self.reference)
        func = rp.resolve_op(case.op)
        first: rp.Metric | None = None
        failed = 0
        n = 0
        with torch.no_grad(), (st.applied(self.settings) if self.settings is not None else contextlib.nullcontext()):
            for n in range(1, self.repeats + 1):
                self.runs += 1
                ins = [i.make(self.device) for i in case.inputs]
                args = _fill(case.args, ins, self.device)
                kwargs = {k: _fill(v, ins, self.device) for k, v in case.kwargs.items()}
                try:
                    ref, rargs, rkw, _ = rp.reference_call(func, _on_reference(case, ins, ref_dev), upcast)
                    with rp.injector(self.faults):
                        out = rp.out_list(func(*args, **kwargs))
                except Exception as e:  # a shape the op rejects is not "the same failure"
                    return Outcome(metric=rp.Metric(cls="crash", message=f"{type(e).__name__}: {e}"), repeats=n,
                                   failed=1)
                m = rp.compare_op(func, out[case.output], ref[case.output], not upcast, rargs, rkw, case.output, ins)
                if m is not None:
                    failed += 1
                    first = first or m
                    break  # one failure is enough while shrinking; the repro counts k of n itself
        return Outcome(metric=first, repeats=n, failed=failed)

    def rate(self, case: OpCase, trials: int) -> tuple[int, rp.Metric | None]:
        """(failures, the first failure's metric) of the case in `trials` runs, none skipped: how
        often an intermittent failure shows."""
        once = Target(device=self.device, reference=self.reference, faults=self.faults, repeats=1,
                      settings=self.settings)
        failed, first = 0, None
        for _ in range(trials):
            out = once.run(case)
            if out.metric is not None:
                failed += 1
                first = first or out.metric
        self.runs += once.runs
        return failed, first


def _fill(x: Any, ins: list[torch.Tensor], device: str, upcast: bool = False) -> Any:
    if isinstance(x, list):
        return [_fill(v, ins, device, upcast) for v in x]
    if isinstance(x, dict) and "in" in x:
        return ins[x["in"]]
    return rp.decode(x, {}, device, upcast)


def op_case(rec: fmt.OpRecord, inputs: list[torch.Tensor], output: int) -> OpCase:
    """The divergent op with the suspect's recorded inputs (tensor args renumbered)."""
    counter = iter(range(len(inputs)))

    def sub(x: Any) -> Any:
        if isinstance(x, list):
            return [sub(v) for v in x]
        if isinstance(x, dict) and "t" in x:
            return {"in": next(counter)}
        return x

    args = sub(rec.args)
    kwargs = {k: sub(v) for k, v in rec.kwargs.items()}
    ins = tuple(Input(kind="data", shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                      data=t.contiguous(), order=fmt.dims_in_memory(t)) for t in inputs)
    return OpCase(op=rec.op, args=args, kwargs=kwargs, inputs=ins, output=output)


# --- passes over an OpCase ---------------------------------------------------------------------

def _structural(i: Input) -> bool:
    """An integer input kept as recorded data: indices, offsets or lengths into the other inputs, whose
    values the shrinker must not change (nor shrink the dims they point into)."""
    return i.kind == "data" and i.dtype != "bool" and not getattr(torch, i.dtype).is_floating_point


def _halve_size(case: OpCase, size: int) -> OpCase | None:
    """Every dimension of `size` in every input halved at once (shared dims stay consistent: the
    k of a matmul is one size in both operands); shape arguments equal to it follow. Refused while an
    integer input kept as recorded data holds a value above the new size: such values are indices or
    offsets into the other inputs (a grouped GEMM's `offs`), and an op that does not check them reads and
    writes past the shrunk tensors (a case whose result is undefined: its repro.py failed on a healthy
    host by the garbage it read)."""
    new = size // 2
    if new < 1 or any(_structural(i) and i.data.numel() and int(i.data.max()) > new for i in case.inputs):
        return None
    ins = []
    for i in case.inputs:
        shape = tuple(new if s == size else s for s in i.shape)
        data = i.data
        if data is not None:
            data = data[tuple(slice(0, new) if s == size else slice(None) for s in i.shape)].contiguous()
        ins.append(replace(i, shape=shape, data=data))

    def sub(x: Any) -> Any:  # view/reshape sizes in the args
        if isinstance(x, list):
            return [sub(v) for v in x]
        return new if isinstance(x, int) and not isinstance(x, bool) and x == size and size > 1 else x

    return replace(case, inputs=tuple(ins), args=sub(case.args))


def pass_dims(sh: Shrinker[OpCase]) -> None:
    sizes = sorted({s for i in sh.current.inputs for s in i.shape if s > 1}, reverse=True)
    for size in sizes:
        # halve this size repeatedly while the failure holds
        while True:
            sizes_now = {s for i in sh.current.inputs for s in i.shape}
            if size not in sizes_now:
                break
            cand = _halve_size(sh.current, size)
            if cand is None or not sh.consider(cand):
                break
            size //= 2


def pass_values(sh: Shrinker[OpCase]) -> None:
    for k in range(len(sh.current.inputs)):
        if _structural(sh.current.inputs[k]):
            continue  # zeros for a grouped GEMM's offsets leave every output row undefined
        for kind in VALUE_KINDS[:-1]:
            cur = sh.current.inputs[k]
            if VALUE_KINDS.index(kind) >= VALUE_KINDS.index(cur.kind):
                break
            if not getattr(torch, cur.dtype).is_floating_point and kind == "ints":
                continue
            cand_in = Input(kind=kind, shape=cur.shape, dtype=cur.dtype, seed=k + 1 if kind == "ints" else 0,
                            order=cur.order)
            ins = list(sh.current.inputs)
            ins[k] = cand_in
            if sh.consider(replace(sh.current, inputs=tuple(ins))):
                break


def pass_layout(sh: Shrinker[OpCase]) -> None:
    """Row-major inputs where the failure holds without the recorded layout: the file then says which
    layouts it needs."""
    for k in range(len(sh.current.inputs)):
        if sh.current.inputs[k].order is not None:
            ins = list(sh.current.inputs)
            ins[k] = replace(ins[k], order=None)
            sh.consider(replace(sh.current, inputs=tuple(ins)))


@dataclass(slots=True, kw_only=True)
class ShrinkResult:
    """What `shrink_capture` found and produced."""

    divergence: rp.Divergence
    case: OpCase
    metric: rp.Metric
    ops: int
    runs: int
    tries: int
    seconds: float
    stack: list[str] = field(default_factory=list)
    history: list[OpCase] = field(default_factory=list)
    """Earlier ops (recorded inputs, in order) the failure needs before `case`; empty: it fails alone.
    Their inputs are not shrunk, nor the target's in that case."""
    rate: trials.Rate | None = None
    """How often the shrunk case fails on the suspect: the op alone, or after its kept history."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The bit-changing settings repro.py sets: those the failure needs (the history path: as recorded)."""
    recorded: dict[str, Any] = field(default_factory=dict)
    """The recorded settings that differ from torch's defaults (what `settings` was shrunk from; empty on
    the history path, whose settings are kept as recorded)."""


def shrink_capture(root: str, *, reference: str = "cpu64", device: str | None = None, rank: int | None = None,
                   inject: str | None = None, repeats: int = 3, live_inject: bool = False,
                   passes: int = 3) -> ShrinkResult:
    """Capture -> the smallest case that fails like the step did (NotReproducible if none): one op when
    the divergent op fails alone, else the few earlier ops it needs (`shrink_history`).

    `passes`: whole-step replays tried until one diverges (an intermittent chip computes some right).
    `live_inject`: the `inject` fault's after/count number the matching calls of each candidate as it
    runs (a chip whose fault depends on what ran before it) instead of staying attached to the
    original op; this is how the simulation exercises the history path."""
    import time

    t0 = time.perf_counter()
    cap = fmt.load(root, rank)
    dev = device or cap.device
    for _ in range(max(1, passes)):  # an intermittent chip may compute one replay right
        res = rp.replay(cap, device=dev, reference=reference, inject=inject)
        div = res.divergence
        if div is not None:
            break
    if div is None:
        raise NotReproducible(f"{root} rank {cap.rank}: replay on {dev} agrees with {reference} at every op "
                              f"({res.ops} ops) in {max(1, passes)} replays; nothing to shrink (pass --inject to "
                              "simulate a fault, or --passes N for a rarer intermittent one)"
                              + (f"; note: {why}" if (why := rp.unchecked_note(cap)) else ""))
    rec = next(o for o in cap.ops if o.index == div.index)
    sim = rp.Simulation.parse(inject, cap.rank)
    faults = sim.schedule(cap.ops).get(div.index) if sim else None
    if live_inject:  # the simulated chip counts matching calls as they run: a fault may need history
        faults = [replace(f, ranks=None, probe=None, scope="probe", at="call") for f in sim.faults] if sim else None
    # the case runs under the settings the step ran under, until they are shrunk too
    target = Target(device=dev, reference=reference, faults=faults, repeats=repeats, settings=dict(cap.settings))
    case = op_case(rec, div.inputs, div.output)
    # how often the op fails alone: every time (a hard fault), k of n (intermittent: every candidate
    # then gets the trials that see it at that rate), or never (the failure needs history)
    failed, first_metric = target.rate(case, trials.MEASURE)
    if first_metric is None:
        hist = shrink_history(cap, div, case, device=dev, reference=reference, inject=inject, faults=faults,
                              repeats=repeats)
        if hist is None:
            raise NotReproducible(f"op #{div.index} {div.op} diverged in the step but neither alone nor after "
                                  f"every earlier op (replayed on recorded inputs) in {repeats} runs")
        kept, metric, runs, tries, rate = hist
        return ShrinkResult(divergence=div, case=case, metric=metric, ops=len(kept) + 1, runs=target.runs + runs,
                            tries=tries, seconds=time.perf_counter() - t0, stack=div.stack, history=kept,
                            settings=st.differs(cap.settings), rate=rate)
    measured = trials.Rate(device=dev, failed=failed, trials=trials.MEASURE)
    target.repeats = max(repeats, measured.plan)
    sig = first_metric.signature()

    def fails(c: OpCase) -> bool:
        out = target.run(c)
        return out.metric is not None and out.metric.signature() == sig

    sh: Shrinker[OpCase] = Shrinker(current=case, fails=fails, key=OpCase.key, ident=OpCase.ident)
    best = sh.run([pass_dims, pass_values, pass_layout])

    def fails_under(s: dict[str, Any]) -> bool:
        target.settings = s
        return fails(best)

    needed = st.shrink(cap.settings, fails_under)
    target.settings = needed
    k, final = target.rate(best, trials.MEASURE)
    rate = trials.Rate(device=dev, failed=k, trials=trials.MEASURE) if k else measured
    return ShrinkResult(divergence=div, case=best, metric=final or first_metric, ops=1, runs=target.runs,
                        tries=sh.calls, seconds=time.perf_counter() - t0, stack=div.stack, rate=rate,
                        settings=needed, recorded=st.differs(cap.settings))


# --- the failure needs history -------------------------------------------------------------------

def run_sequence(ops: list[OpCase], target: OpCase, *, device: str, reference: str,
                 faults: list[Any] | None) -> rp.Metric | None:
    """`ops` then `target` on the suspect, each on its own recorded inputs (cut at recorded values: no op
    reads another's output), under ONE injector (the fault counts calls across the sequence); the
    target's output against the reference. An earlier op that cannot run alone is skipped."""
    ref_dev, upcast = rp.parse_reference(reference)
    with torch.no_grad():
        with rp.injector(faults):
            for c in ops:
                ins = [i.make(device).clone() for i in c.inputs]
                try:
                    rp.resolve_op(c.op)(*_fill(c.args, ins, device),
                                        **{k: _fill(v, ins, device) for k, v in c.kwargs.items()})
                except Exception:  # noqa: BLE001 - not this op's failure: it is dead code anyway
                    continue
            ins = [i.make(device).clone() for i in target.inputs]
            func = rp.resolve_op(target.op)
            try:
                out = rp.out_list(func(*_fill(target.args, ins, device),
                                       **{k: _fill(v, ins, device) for k, v in target.kwargs.items()}))
            except Exception as e:  # noqa: BLE001
                return rp.Metric(cls="crash", message=f"{type(e).__name__}: {e}")
        ref, rargs, rkw, _ = rp.reference_call(func, _on_reference(target, [i.make("cpu") for i in target.inputs],
                                                                    ref_dev), upcast)
        return rp.compare_op(func, out[target.output], ref[target.output], not upcast, rargs, rkw, target.output,
                             ins)


def _on_reference(case: OpCase, ins: list[torch.Tensor],
                  ref_dev: str) -> Callable[[bool], tuple[list[Any], dict[str, Any]]]:
    """`reference_call`'s builder: the case's arguments on copies of `ins` on the reference device."""
    def build(up: bool) -> tuple[list[Any], dict[str, Any]]:
        rins = [rp.to_reference(t, ref_dev, up) for t in ins]
        return _fill(case.args, rins, ref_dev, up), {k: _fill(v, rins, ref_dev, up) for k, v in case.kwargs.items()}
    return build


def prefix_cases(cap: fmt.Capture, upto: int, *, device: str, inject: str | None) -> list[OpCase]:
    """Every op before op #`upto` as an OpCase on the suspect's inputs (the teacher-forced replay's
    values, as `rp.replay` sees them); substituted ops (RNG, collectives) are cut: their outputs are
    recorded, and no candidate reads another op's output."""
    sim = rp.Simulation.parse(inject, cap.rank)
    schedule = sim.schedule(cap.ops) if sim else {}
    live: dict[int, Any] = {vid: rp.external(cap, ref, device) for vid, ref in cap.tensors.items()}
    dummy = rp.ReplayResult(rank=cap.rank, ops=0, divergence=None, capture_mismatch=None)
    cases: list[OpCase] = []
    with torch.no_grad():
        for rec in cap.ops:
            if rec.index >= upto:
                break
            args = rp.decode(rec.args, live, device)
            kwargs = {k: rp.decode(v, live, device) for k, v in rec.kwargs.items()}
            if rec.substituted:
                outs = rp.substitute(cap, rec, args, device, dummy, False)
            else:
                snap = [t.detach().clone().cpu() for t in fmt.flat_tensors(args) + fmt.flat_tensors(
                    list(kwargs.values()))]
                try:
                    cases.append(op_case(rec, snap, 0))
                except StopIteration:  # a tensor the JSON args do not name: not replayable alone
                    pass
                with rp.injector(schedule.get(rec.index)):
                    outs = rp.out_list(rp.resolve_op(rec.op)(*args, **kwargs))
            for vid, t in zip(rec.outputs, outs, strict=False):
                if vid is not None and isinstance(t, torch.Tensor):
                    live[vid] = t
    return cases


def shrink_history(cap: fmt.Capture, div: rp.Divergence, case: OpCase, *, device: str, reference: str,
                   inject: str | None, faults: list[Any] | None, repeats: int = 3
                   ) -> tuple[list[OpCase], rp.Metric, int, int, trials.Rate] | None:
    """The divergent op fails only after earlier ops: (kept earlier ops, metric, runs, candidates tried,
    how often the kept sequence fails), or None when even the whole prefix does not reproduce.

    0. the whole prefix runs `trials.MEASURE` times: a failure that shows k of n times is intermittent,
       and every candidate below gets the trials that see it at that rate (a candidate tried too few
       times would be dropped as not failing, and the history cut wrongly); 1. suffix bisection (`find_integer` from the divergent op backwards) for the shortest failing
       suffix of the op list; 2. dead-code removal: every kept op is dead (cut at recorded values, none
       reads another's output), so first try keeping only the ops of the target's kind, then 3. `ddmin`
       over what is left, the target always last. Candidates are cached by their op positions."""
    prior = prefix_cases(cap, div.index, device=device, inject=inject)
    sig = div.metric.signature()
    cache: dict[tuple[int, ...], bool] = {}
    runs = 0

    def fails(idx: tuple[int, ...]) -> bool:
        nonlocal runs
        if idx not in cache:
            ok = False
            for _ in range(repeats):  # k-of-n: one failure is enough
                runs += 1
                m = run_sequence([prior[i] for i in idx], case, device=device, reference=reference, faults=faults)
                if m is not None and m.signature() == sig:
                    ok = True
                    break
            cache[idx] = ok
        return cache[idx]

    def rate(idx: tuple[int, ...]) -> tuple[int, rp.Metric | None]:
        nonlocal runs
        k, first = 0, None
        for _ in range(trials.MEASURE):
            runs += 1
            m = run_sequence([prior[i] for i in idx], case, device=device, reference=reference, faults=faults)
            if m is not None and m.signature() == sig:
                k, first = k + 1, first or m
        return k, first

    n = len(prior)
    whole, _ = rate(tuple(range(n)))
    if not whole:
        return None
    repeats = max(repeats, trials.Rate(device=device, failed=whole, trials=trials.MEASURE).plan)
    cache[tuple(range(n))] = True
    # largest suffix length that does NOT fail, so +1 is the shortest failing one (monotone enough)
    k = find_integer(lambda m: m < n and not fails(tuple(range(n - m, n)))) + 1
    idx = list(range(n - k, n))
    same = [i for i in idx if prior[i].op == case.op]
    if len(same) < len(idx) and fails(tuple(same)):
        idx = same
    if idx:
        idx = ddmin(idx, lambda sub: fails(tuple(sub)))
    kept = [prior[i] for i in idx]
    k, metric = rate(tuple(idx))
    measured = trials.Rate(device=device, failed=k or whole, trials=trials.MEASURE)
    return kept, metric or div.metric, runs, len(cache), measured


@dataclass(slots=True, kw_only=True)
class CollectiveCase:
    """A collective that went wrong: every rank's input (group-rank order) and the group size."""

    op: str
    world: int
    inputs: list[torch.Tensor]
    divergence: rp.Divergence
    env: dict[str, str] = field(default_factory=dict)
    """The bit-changing environment variables the file sets (NCCL's algorithm, protocol, channels: they
    decide a reduction's order on GPUs): as the divergent rank ran under them, or those the failure
    needs once shrunk (verify.shrink_env)."""
    recorded_env: dict[str, str] | None = None
    """What `env` was shrunk from; None while it is as recorded."""


def shrink_collective(root: str, *, device: str | None = None) -> CollectiveCase:
    """Every rank's replay; the first collective (all-reduce, all-gather, reduce-scatter, broadcast,
    all-to-all, a send and its receive) whose result differs from the exact host-side one
    (`group_check.check_collectives`), over however many ranks captured it."""
    caps = fmt.load_all(root)
    if len(caps) < 2:
        raise NotReproducible(f"{root}: one rank captured; a collective repro needs every rank's capture")
    results = [rp.replay(c, device=device or c.device, reference=c.device, stop_at_first=False,
                         keep_collectives=True) for c in caps]
    unjudged: list[str] = []
    div = group_check.check_collectives(results, caps, unjudged)
    if div is None:
        left = (f"; {len(unjudged)} not judged ({'; '.join(unjudged[:3])}{'; ...' if len(unjudged) > 3 else ''})"
                if unjudged else "")
        raise NotReproducible(f"{root}: every all-reduce, all-gather, reduce-scatter, broadcast, all-to-all and "
                              f"send/recv matches the exact result of the ranks' inputs{left}")
    # the group of the call that went wrong: a subgroup's size, not the number of ranks captured
    env = next((st.env_of(c.settings) for c in caps if c.rank == div.rank), {})
    return CollectiveCase(op=div.op, world=len(div.inputs), inputs=list(div.inputs), divergence=div, env=env)
