"""Collective probe: every collective the training stack uses, exact and timed as nccl-tests does.

Catches: a rank whose contribution arrives wrong or not at all, misrouted chunks, corrupting
NICs/NVLinks inside a collective, collectives far below their bus bandwidth.

Each rank contributes integer patterns that encode its rank and the element index, chosen
below the dtype's exact-integer limit, so the result is exact in any reduction order and a
wrong element *decodes*: which rank's contribution is missing (sums carry 2**rank), which rank
won a max it should not have, which source rank / destination / element a misrouted value
came from (copies carry rank * M + index).

Speed as nccl-tests reports it: time per op, algbw = bytes / time, busbw = algbw * factor
(all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast and the
send/recv ring 1), with sizes swept from `min_bytes` to `max_bytes` by `factor` (-b/-e/-f).

Defined once for every backend: the sizes, patterns, checks, timing, metrics and blame are
`measure`'s; a backend supplies only a `Group` (the collective over the ranks this process drives:
`TorchGroup` here, one c10d rank per process; probes/jax_collectives.py's over a JAX mesh).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any

from ..results import Blame, Mismatch, Oracle
from .backends import backend_of, oracles
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, Unsupported, profile_table, register
from .keeping import KeepPolicy, keep

OPS = ("all_reduce_sum", "all_reduce_max", "all_gather", "reduce_scatter", "broadcast", "all_to_all",
       "sendrecv_ring")
DTYPES = ("float32", "bfloat16", "int32")
REPLICATED = frozenset({"all_reduce_sum", "all_reduce_max", "all_gather", "broadcast"})
"""Ops after which every rank holds the same result: a strict majority holding it right outvotes the rest."""
REDUCTIONS = frozenset({"all_reduce_sum", "all_reduce_max", "reduce_scatter"})
"""Ops whose every output element comes from every rank's input: a bad element nobody can decode may be any
rank's doing, not only its observers' (one corrupted reduce_scatter shard is seen by its one holder)."""
# Largest integer every value (and every partial sum) must stay below to be exact in the dtype.
EXACT_LIMIT = {"float32": 2**24, "bfloat16": 2**8, "float16": 2**11, "int32": 2**31}
KEEP = KeepPolicy(by_tensor=True)
"""The first mismatch per (oracle, tensor) a rank is blamed for (the torch and JAX paths alike)."""


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw / algbw factor (doc/PERFORMANCE.md)."""
    if op.startswith("all_reduce"):
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


def _pow2_floor(x: float) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


@dataclass(frozen=True, slots=True)
class Code:
    """How values encode (rank, index) for one op, world size and dtype, within the exact limit."""

    n: int
    limit: int
    rank_bits: int  # sums: ranks below this contribute 2**rank
    g_mod: int  # the index part cycles with this period
    slot_mod: int = 1 << 62  # copies: the slot (source rank, ...) wraps here when the dtype is too narrow

    @staticmethod
    def for_sum(n: int, dtype: str) -> Code:
        limit = EXACT_LIMIT[dtype]
        rbits = min(n, max(1, limit.bit_length() - 2))
        room = limit - (2**rbits - 1)
        g = _pow2_floor(max(1, (room - 1) // n + 1)) if room > n else 1
        while g > 1 and n * (g - 1) + 2**rbits - 1 >= limit:
            g //= 2
        return Code(n, limit, rbits, g)

    @staticmethod
    def for_copy(n: int, dtype: str, slots: int = 1) -> Code:
        # value = slot * M + (i mod M) with slots = n (source rank) or n*n (source, destination)
        limit = EXACT_LIMIT[dtype]
        if limit >= slots:
            return Code(n, limit, 0, _pow2_floor(limit // slots))
        # Copies need no arithmetic, only representable values: wrap the slot (decoding becomes
        # ambiguous modulo `limit`, the comparison stays exact).
        return Code(n, limit, 0, 1, slot_mod=limit)


@register("collectives")
class CollectivesProbe(Probe):
    order = 50
    min_devices = 2
    collective = True
    speed_metric = "busbw_gbps_best"
    speed_kernel = ""  # a slow collective is a link's matter: chipcheck links
    jax = "jax_collectives"

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        ops: tuple[str, ...] = OPS
        """Collectives to run."""
        dtypes: tuple[str, ...] = DTYPES
        """Element types (exact patterns in each)."""
        min_bytes: int = 8
        """Smallest message (nccl-tests -b)."""
        max_bytes: int = 1 << 20
        """Largest message (nccl-tests -e)."""
        factor: int = 8
        """Size multiplier between steps (nccl-tests -f)."""
        iters: int = 5
        """Timed ops per measurement."""
        timed_loops: int = 3
        """Measurements per size (the best is the chip's, the median is reported)."""
        checks: int = 2
        """Untimed, freshly initialised ops verified per size."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("collectives", profile, device_kind)
        cfg = self.Config(min_bytes=int(p["min_bytes"]), max_bytes=int(p["max_bytes"]), factor=int(p["factor"]),
                          iters=int(p["iters"]), timed_loops=int(p.get("timed_loops", 3)),
                          checks=int(p.get("checks", 2)))
        if cfg.min_bytes < 1 or cfg.max_bytes < cfg.min_bytes or cfg.factor < 2:
            raise InvalidConfig("collectives: need 1 <= min_bytes <= max_bytes and factor >= 2")
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return [f"{op}/{dt}" for op in cfg.ops for dt in cfg.dtypes]

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        if ctx.group is None:
            raise InvalidConfig("collectives need a process group (run under the launcher or torchrun)")
        g = TorchGroup(ctx)
        return measure(g, cfg, case)[g.local[0]]


View = tuple[bool, list[int]]
"""One rank's view of one check: (saw a mismatch, the ranks its decoding names)."""


class Group:
    """A collective over the ranks this process drives: a backend's whole part of the probe.

    `measure` builds every step (inputs, expected output) on `device`, and calls these in the same
    order in every process of the job; each is collective over all of the group's ranks.
    """

    n: int
    local: list[int]  # the global ranks this process drives
    device: Any  # where the steps' torch tensors live
    params: dict[str, Any]  # what the outcome records about the backend

    def check_once(self, steps: dict[int, CollectiveStep]) -> None:
        """The op once on freshly initialised steps, under the fault model; each output lands in step.buf."""
        raise NotImplementedError

    def timed(self, steps: dict[int, CollectiveStep], iters: int, loops: int) -> list[float]:
        """Seconds per op: `loops` measurements of `iters` back-to-back ops."""
        raise NotImplementedError

    def exchange(self, case: str, views: list[dict[int, View]]) -> list[list[View]]:
        """Every rank's view of every check, from this process's ranks' views (collective)."""
        raise NotImplementedError

    def run_pairs(self, step: CollectiveStep, pairs: list[tuple[int, int]]) -> list[bool] | None:
        """The step's op once more in each pair of ranks, faults on (collective: every rank calls it with
        the same pairs): whether each pair's result was wrong on either of its ranks. None where the
        backend cannot re-run in pairs (then the decoding stands)."""
        return None


def measure(g: Group, cfg: CollectivesProbe.Config, case: str) -> dict[int, CaseOutcome]:
    """One collectives case over the group: each size's checks, then its timed loops; then one
    exchange of every rank's views and the blame. One outcome per rank this process drives."""
    import torch

    op, _, dtype = case.partition("/")
    if op not in OPS or dtype not in EXACT_LIMIT:
        raise InvalidConfig(f"unknown collectives case {case!r}")
    n = g.n
    tdt = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdt).element_size()
    outs = {r: CaseOutcome(case=case, params={"op": op, "dtype": dtype, "world_size": n, "sizes": [], **g.params})
            for r in g.local}
    checked: list[dict[int, tuple[CollectiveStep, Mismatch | None]]] = []  # per check: this process's ranks
    size = cfg.min_bytes
    while size <= cfg.max_bytes:
        count = max(n, size // esize)
        count -= count % n  # per-rank buffers split evenly into n chunks
        steps = {r: CollectiveStep(op=op, n=n, r=r, count=count, dtype=dtype, tdt=tdt, device=g.device)
                 for r in g.local}
        for _ in range(cfg.checks):
            for s in steps.values():
                s.init()
            g.check_once(steps)
            # judged once every rank's views are in; suspects() and the blame need only the step's
            # shape (op, rank, count), which the next check keeps
            checked.append({r: (s, s.check()) for r, s in steps.items()})
        for s in steps.values():
            s.init()
        loops = g.timed(steps, cfg.iters, cfg.timed_loops)
        nbytes = count * esize
        t_best, t_med = min(loops), statistics.median(loops)
        algbw, factor = nbytes / t_med / 1e9, bus_factor(op, n)
        for out in outs.values():
            out.params["sizes"].append(nbytes)
            out.metrics[f"{nbytes}B:time_us"] = t_med * 1e6
            out.metrics[f"{nbytes}B:algbw_gbps"] = algbw
            out.metrics[f"{nbytes}B:busbw_gbps"] = algbw * factor
            # at the largest size, as nccl-tests' headline
            out.metrics["busbw_gbps"] = algbw * factor
            out.metrics["busbw_gbps_best"] = nbytes / t_best / 1e9 * factor
        size *= cfg.factor
    views = g.exchange(case, [{r: (m is not None, s.suspects(m) if m is not None else []) for r, (s, m) in c.items()}
                              for c in checked])
    # Decoding names a rank only by inference (a flipped bit can mimic a missing contribution) or names
    # nobody: the op runs again in pairs, once per check that needs it, so the fault follows the chip.
    # One verdict from all of the case's pair runs: a fault that shows only in some data (what a rank
    # sends into a max shows only where it wins) fails its pairs in some runs, never in all.
    needing = [k for k, v in enumerate(views) if n >= 3 and _needs_pairs(v, op)]
    pv = localize(g, [next(iter(checked[k].values()))[0] for k in needing]) if needing else None
    sizes = len(checked) // max(1, cfg.checks)
    for i in range(sizes):
        bad = dict.fromkeys(g.local, False)
        for k in range(i * cfg.checks, (i + 1) * cfg.checks):
            for r, b in _judge(outs, checked[k], views[k], pv if k in needing else None).items():
                bad[r] |= b
        for r, out in outs.items():
            out.repeats += 1
            out.repeats_bad += int(bad[r])
    return outs


def _judge(outs: dict[int, CaseOutcome], checked: dict[int, tuple[CollectiveStep, Mismatch | None]],
           views: list[View], pv: PairVerdict | None) -> dict[int, bool]:
    """Every rank's view of one check, and what the case's pair re-runs said (`pv`, where this check
    needed them) -> whether each of this process's ranks is to blame.

    All ranks of a collective see a corrupted result; blaming all of them would drain innocent
    nodes. Decoding names the source of bad data where the pattern allows (copies: the source
    rank of the bad chunk; sums: ranks whose contribution is missing). A named rank is wrong;
    a rank that only observed it records the observation and is not blamed. The pairs' verdict
    comes first; where the pairs name no one (an intermittent fault) the decoding stands, less the
    ranks a passing pair cleared. When nobody can be named, the observers share the evidence
    (fleet.judge.blame resolves it; `chipcheck links` localises further).
    """
    culprits, why, cleared = (pv.named, pv.why, pv.cleared) if pv else ([], "", frozenset[int]())
    result = {}
    for r, (s, m) in checked.items():
        kept, observed = blame(r, m, views, tensor=s.op, count=s.count, cleared=cleared)
        if culprits:
            # the pairs' verdict first, then what the decoding said (this rank's view, or who named it)
            said = kept.note if kept is not None else m.note if m is not None else ""
            kept = None
            if r in culprits:
                kept = Mismatch(oracle=Oracle.EXACT, tensor=s.op, bad_elements=m.bad_elements if m else 0,
                                total_elements=s.count, first_indices=m.first_indices if m else [],
                                bit_histogram=m.bit_histogram if m else {},
                                note=f"pair tests name rank {r}: {why}" + (f"; {said}" if said else ""))
            elif m is not None:
                observed = f"saw {m.bad_elements} bad elements; pair tests name rank(s) {culprits}: {why}"
        if observed:
            outs[r].params.setdefault("observed", []).append(observed)
        if kept is not None:
            keep(outs[r], kept, KEEP)
        result[r] = kept is not None
    return result


class TorchGroup(Group):
    """torch.distributed: this process is one rank of the probe's process group (c10d; gloo or NCCL)."""

    def __init__(self, ctx: ProbeContext):
        import torch.distributed as dist

        assert ctx.group is not None
        self.ctx, self.pg = ctx, ctx.group()
        self.n, self.local = dist.get_world_size(self.pg), [dist.get_rank(self.pg)]
        self.device, self.params = ctx.device, {}

    def check_once(self, steps: dict[int, CollectiveStep]) -> None:
        [s] = steps.values()
        with self.ctx.under_test():
            _c10d(s, self.pg)
        self.ctx.timer.sync()

    def timed(self, steps: dict[int, CollectiveStep], iters: int, loops: int) -> list[float]:
        import torch.distributed as dist

        [s] = steps.values()
        out = []
        for _ in range(loops):
            s.init()
            dist.barrier(self.pg)
            t0 = time.perf_counter()
            with self.ctx.under_test():
                for _ in range(iters):
                    _c10d(s, self.pg)
            self.ctx.timer.sync()
            out.append((time.perf_counter() - t0) / iters)
        return out

    def exchange(self, case: str, views: list[dict[int, View]]) -> list[list[View]]:
        import torch.distributed as dist

        [r] = self.local
        got: list[Any] = [None] * self.n
        dist.all_gather_object(got, [v[r] for v in views], group=self.pg)
        return [[got[i][k] for i in range(self.n)] for k in range(len(views))]

    def run_pairs(self, step: CollectiveStep, pairs: list[tuple[int, int]]) -> list[bool] | None:
        import torch.distributed as dist

        n, r = step.n, step.r
        mine = []
        for p in pairs:
            if (n, p) not in _PAIR_GROUPS:  # new_group is collective: every rank creates every pair's, in order
                _PAIR_GROUPS[n, p] = dist.new_group(sorted(p))
            if r not in p:
                mine.append(False)
                continue
            # its position is its rank in the pair's group, which new_group numbers in ascending global
            # order: pair (n-1, 0) is group [0, n-1]; placed as listed, its healthy re-run failed
            sub = step.in_pair(sorted(p).index(r))
            sub.init()
            with self.ctx.under_test():
                _c10d(sub, _PAIR_GROUPS[n, p])
            self.ctx.timer.sync()
            mine.append(sub.check() is not None)
        views: list[Any] = [None] * n
        dist.all_gather_object(views, mine, group=self.pg)
        return [any(v[i] for v in views) for i in range(len(pairs))]


_PAIR_GROUPS: dict[tuple[int, tuple[int, int]], Any] = {}
MAX_PAIR_OFFSET = 4
"""Pair rounds at the most: ring neighbours (k, k+1), then (k, k+2), ... while ranks stay undecided."""


@dataclass(frozen=True, slots=True)
class PairVerdict:
    """What the pair re-runs say: the ranks they name, the ranks a passing pair cleared, and why."""

    named: list[int]
    cleared: frozenset[int]
    undecided: frozenset[int]
    why: str


def offset_pairs(n: int, d: int) -> list[tuple[int, int]]:
    """The pairs (k, k+d mod n) for every rank k, each pair once."""
    seen: set[frozenset[int]] = set()
    out = []
    for k in range(n):
        p = (k, (k + d) % n)
        if frozenset(p) not in seen:
            seen.add(frozenset(p))
            out.append(p)
    return out


def pair_verdict(n: int, pairs: list[tuple[int, int]], failed: set[int]) -> PairVerdict:
    """The ranks named by which of `pairs` failed (indices into it), for a fault that stays with its chip.

    A rank in a pair that passed is cleared. A failed pair holding a cleared rank names the other one.
    A failed pair of two cleared ranks contradicts the premise (an intermittent fault, or the link
    between them): nobody is named and nobody cleared. A rank whose every pair failed with partners that
    are not cleared either stays undecided: one bad partner explains it as well as its own fault."""
    bad = [p for i, p in enumerate(pairs) if i in failed]
    which = f"ring pairs of {n} ranks" if pairs == offset_pairs(n, 1) else f"{len(pairs)} pairs of {n} ranks, ring and wider"
    said = f"the op failed in pairs {bad} and passed in the others ({which})"
    ok = {r for i, p in enumerate(pairs) if i not in failed for r in p}
    if not bad or any(set(p) <= ok for p in bad):
        return PairVerdict([], frozenset(), frozenset(), said + ("; not one chip's fault" if bad else ""))
    named = sorted({b for a, b in bad if a in ok} | {a for a, b in bad if b in ok})
    undecided = frozenset(range(n)) - ok - set(named)
    if undecided:
        said += f"; ranks {sorted(undecided)} undecided"
    return PairVerdict(named, frozenset(ok), undecided, said)


def localize(g: Group, steps: list[CollectiveStep]) -> PairVerdict:
    """Re-run the op in ring pairs (k, k+1), once per step (`_pair_steps`); while ranks stay undecided
    (two bad chips, one rank apart, fail every ring pair between them), in the pairs (k, k+2),
    (k, k+3), ... A pair failed when it failed in any of the runs (collective)."""
    n = steps[0].n
    pairs: list[tuple[int, int]] = []
    failed: set[int] = set()
    verdict = PairVerdict([], frozenset(), frozenset(), "")
    for d in range(1, min(n // 2, MAX_PAIR_OFFSET) + 1):
        new = [p for p in offset_pairs(n, d) if p not in pairs]
        for step in (v for s in steps for v in _pair_steps(s)):
            ran = g.run_pairs(step, new)
            if ran is None:
                return verdict
            failed |= {len(pairs) + i for i, f in enumerate(ran) if f}
        pairs += new
        verdict = pair_verdict(n, pairs, failed)
        if not verdict.undecided:
            break
    return verdict


def _pair_steps(step: CollectiveStep) -> list[CollectiveStep]:
    """What a pair re-run of `step` runs, so that a pair passes only when both ranks did everything the
    op asks of them. A max hides a corrupted contribution that does not win (half of a pair's elements),
    so a bad sender would pass some of its pairs: the same call also sums, which shows every
    contribution. A broadcast runs from each end of the pair."""
    if step.op == "all_reduce_max":
        return [step, dataclasses.replace(step, op="all_reduce_sum")]
    if step.op == "broadcast":  # a pair's non-root sends nothing: each rank of the pair is the root once
        return [step, dataclasses.replace(step, root=1)]
    return [step]


def _needs_pairs(views: list[tuple[bool, list[int]]], op: str) -> bool:
    """Whether the blame rests on more than a strict majority's vote (the same answer on every rank)."""
    observers = [i for i, (bad, _) in enumerate(views) if bad]
    return bool(observers) and not (op in REPLICATED and len(observers) * 2 < len(views))


def blame(me: int, m: Mismatch | None, views: list[tuple[bool, list[int]]], *, tensor: str,
          count: int, cleared: frozenset[int] = frozenset()) -> tuple[Mismatch | None, str]:
    """What rank `me` reports, given every rank's (saw something wrong, ranks its decoding names).

    Returns (the mismatch that makes this rank wrong, or None; a note of what it only observed).
    After an op that leaves every rank the same result, a strict minority of observers is wrong
    (the majority received it right); otherwise a named rank is wrong (with its own view, or
    "named by ..." when its own output was fine);
    a rank that only observed what others are blamed for is not; when nobody can be named, every
    observer holds shared evidence (fleet.judge.blame pins it on a member with evidence of its own,
    or calls the observers suspect) and the ranks that saw nothing are clean. A rank in `cleared`
    (it passed a pair re-run of the op) is neither named by decoding nor a holder of shared evidence.
    """
    observers = [i for i, (bad, _) in enumerate(views) if bad]
    if not observers:
        return None, ""
    if tensor in REPLICATED and len(observers) * 2 < len(views):
        # Every rank received the same result and a strict majority received it right: the bad
        # copies were damaged on the way into (or inside) the few ranks that hold them.
        if m is None:
            return None, ""
        agree = len(views) - len(observers)
        return dataclasses.replace(m, note=f"{m.note}; its result differs from the one {agree} of {len(views)} "
                                           f"ranks received (a strict majority): damaged on this rank's side"), ""
    blamed = sorted({s for bad, ss in views if bad for s in ss} - cleared)
    if me in cleared:
        return None, f"saw {m.bad_elements} bad elements; a pair re-run of the op cleared this rank; {m.note}" if m else ""
    if blamed and me not in blamed:
        note = f"saw {m.bad_elements} bad elements; decoding names rank(s) {blamed}; {m.note}" if m else ""
        return None, note
    if m is None and not blamed:
        return None, ""
    if m is None:  # blamed by others: e.g. the sender of the bad data, whose own view was fine
        return Mismatch(oracle=Oracle.EXACT, tensor=tensor, bad_elements=0, total_elements=count,
                        note=f"named by rank(s) {observers} as the source of corrupted data"), ""
    if not blamed:  # every observer holds bad data and nobody is named: some member is bad, not which
        held = range(len(views)) if tensor in REDUCTIONS else observers  # who may have put it there
        return dataclasses.replace(m, note=f"{m.note}; no source decodable among observers {observers}",
                                   blame=Blame.SHARED, group=[o for o in held if o not in cleared]), ""
    return dataclasses.replace(m, note=f"{m.note}; blamed {blamed}"), ""


@dataclass
class CollectiveStep:
    """One collective at one size: its inputs, the call, and the exact expected output."""

    op: str
    n: int
    r: int
    count: int
    dtype: str
    tdt: Any
    device: Any
    root: int = 0  # broadcast's source rank

    def __post_init__(self) -> None:
        import torch

        self.idx = torch.arange(self.count, dtype=torch.int64, device=self.device)
        chunk = self.count // self.n
        if self.op in ("all_reduce_sum", "reduce_scatter"):
            self.code = Code.for_sum(self.n, self.dtype)
        elif self.op == "all_to_all":
            self.code = Code.for_copy(self.n, self.dtype, slots=self.n * self.n)
        else:
            self.code = Code.for_copy(self.n, self.dtype, slots=self.n)
        if self.op == "all_reduce_max" and self.n > self.code.limit:
            raise Unsupported(f"all_reduce_max in {self.dtype} cannot encode {self.n} ranks exactly")
        self.chunk = chunk

    def in_pair(self, position: int) -> CollectiveStep:
        """The same op re-run between two ranks, as the one at `position` (0 or 1) of the pair."""
        return dataclasses.replace(self, n=2, r=position, count=self.count - self.count % 2)

    # ---- inputs ------------------------------------------------------------------------------

    def _t(self, x: Any) -> Any:
        return x.to(self.tdt)

    def _sum_part(self, rank: int, j: Any) -> Any:
        c = self.code
        return (j % c.g_mod) + (2**rank if rank < c.rank_bits else 0)

    def init(self) -> None:
        import torch

        c, n, r = self.code, self.n, self.r
        if self.op == "all_reduce_sum":
            self.buf = self._t(self._sum_part(r, self.idx))
        elif self.op == "all_reduce_max":
            self.buf = self._t(((self.idx + r) % n) * c.g_mod + self.idx % c.g_mod)
        elif self.op == "reduce_scatter":
            self.inp = self._t(self._sum_part(r, self.idx))
            self.buf = torch.empty(self.chunk, dtype=self.tdt, device=self.device)
        elif self.op == "all_gather":
            self.inp = self._t((r % c.slot_mod) * c.g_mod + self.idx[: self.chunk] % c.g_mod)
            self.buf = torch.empty(self.count, dtype=self.tdt, device=self.device)
        elif self.op == "broadcast":
            self.buf = self._t((self.root % c.slot_mod) * c.g_mod + self.idx % c.g_mod) if r == self.root else \
                torch.zeros(self.count, dtype=self.tdt, device=self.device)
        elif self.op == "all_to_all":
            dst = self.idx // self.chunk
            self.inp = self._t(((r * n + dst) % c.slot_mod) * c.g_mod + (self.idx % self.chunk) % c.g_mod)
            self.buf = torch.empty(self.count, dtype=self.tdt, device=self.device)
        elif self.op == "sendrecv_ring":
            self.inp = self._t((r % c.slot_mod) * c.g_mod + self.idx % c.g_mod)
            self.buf = torch.zeros(self.count, dtype=self.tdt, device=self.device)

    @property
    def payload(self) -> Any:
        """What this rank contributes (for the all-reduces and broadcast, the buffer the op works in place on:
        the root's data, zeros on the others)."""
        return self.buf if self.op in ("all_reduce_sum", "all_reduce_max", "broadcast") else self.inp

    # ---- the exact expected output and its decoding ---------------------------------------------

    def expected(self) -> Any:
        c, n = self.code, self.n
        if self.op == "all_reduce_sum":
            return self._t(n * (self.idx % c.g_mod) + (2 ** min(n, c.rank_bits) - 1))
        if self.op == "reduce_scatter":
            j = self.r * self.chunk + self.idx[: self.chunk]
            return self._t(n * (j % c.g_mod) + (2 ** min(n, c.rank_bits) - 1))
        if self.op == "all_reduce_max":
            return self._t((n - 1) * c.g_mod + self.idx % c.g_mod)
        if self.op == "all_gather":
            return self._t(((self.idx // self.chunk) % c.slot_mod) * c.g_mod + (self.idx % self.chunk) % c.g_mod)
        if self.op == "broadcast":
            return self._t((self.root % c.slot_mod) * c.g_mod + self.idx % c.g_mod)
        if self.op == "all_to_all":
            src = self.idx // self.chunk
            return self._t(((src * n + self.r) % c.slot_mod) * c.g_mod + (self.idx % self.chunk) % c.g_mod)
        return self._t((((self.r - 1) % n) % c.slot_mod) * c.g_mod + self.idx % c.g_mod)  # sendrecv_ring

    def check(self) -> Mismatch | None:
        exp = self.expected()
        m = oracles.compare_bits(backend_of(self.buf), exp, self.buf, tensor=self.op, oracle=Oracle.EXACT, tile=max(1, self.chunk))
        if m is None:
            return None
        return dataclasses.replace(m, note=(m.note + " " + self.decode(m)).strip())

    def suspects(self, m: Mismatch) -> list[int]:
        """Ranks the bad elements point at (empty when the pattern cannot say)."""
        c, n = self.code, self.n
        out: set[int] = set()
        for (pos,), got in zip(m.first_indices, m.actual, strict=False):
            if self.op in ("all_gather", "all_to_all"):
                out.add(pos // self.chunk)
            elif self.op == "broadcast":
                out.add(self.root)
            elif self.op == "sendrecv_ring":
                out.add((self.r - 1) % n)
            elif self.op in ("all_reduce_sum", "reduce_scatter") and got == got:
                j = pos + (self.r * self.chunk if self.op == "reduce_scatter" else 0)
                want = 2 ** min(n, c.rank_bits) - 1
                resid = int(got) - n * (j % c.g_mod)
                if 0 <= resid < want:
                    out |= {k for k in range(min(n, c.rank_bits)) if not (resid >> k) & 1}
        return sorted(out)

    def decode(self, m: Mismatch) -> str:
        """Say which rank / chunk the first wrong elements point at."""
        c, n = self.code, self.n
        notes = []
        for (pos,), got in zip(m.first_indices[:4], m.actual[:4], strict=False):
            if got != got:  # NaN
                notes.append(f"[{pos}] NaN")
                continue
            v = int(got)
            if self.op in ("all_reduce_sum", "reduce_scatter"):
                j = pos + (self.r * self.chunk if self.op == "reduce_scatter" else 0)
                resid = v - n * (j % c.g_mod)
                want = 2 ** min(n, c.rank_bits) - 1
                missing = [k for k in range(min(n, c.rank_bits)) if not (resid >> k) & 1] if 0 <= resid < 2 * want + 2 \
                    else []
                if 0 <= resid <= want and missing:
                    notes.append(f"[{pos}] missing the contribution of rank(s) {missing}")
                else:
                    notes.append(f"[{pos}] off by {resid - want} (a corrupted contribution, not a missing one)")
            elif self.op == "all_reduce_max":
                q = (v - pos % c.g_mod) // c.g_mod
                winner = (q - pos) % n
                notes.append(f"[{pos}] max came from rank {winner}'s value, expected rank {(n - 1 - pos) % n}'s"
                             if 0 <= q < n else f"[{pos}] value {v} decodes to no rank")
            else:
                slot, i = divmod(v, c.g_mod)
                chunk = pos // self.chunk if self.op in ("all_gather", "all_to_all") else None
                if self.op == "all_to_all":
                    s, d = divmod(slot, n)
                    notes.append(f"[{pos}] holds (src {s}, dst {d}, elem {i}); expected src {chunk} dst {self.r}")
                elif self.op == "all_gather":
                    notes.append(f"[{pos}] holds rank {slot}'s elem {i}; expected rank {chunk}'s")
                else:
                    src = self.root if self.op == "broadcast" else (self.r - 1) % n
                    notes.append(f"[{pos}] holds rank {slot}'s elem {i}; expected rank {src}'s")
        return "decoded: " + "; ".join(notes)


def _c10d(s: CollectiveStep, g: Any) -> None:
    """The step's collective through torch.distributed over process group `g`."""
    import torch.distributed as dist

    # src and peers are global ranks, even in a pair group
    group: Any = g if g is not None else dist.group.WORLD
    glob = functools.partial(dist.get_global_rank, group)
    if s.op == "all_reduce_sum":
        dist.all_reduce(s.buf, op=dist.ReduceOp.SUM, group=g)
    elif s.op == "all_reduce_max":
        dist.all_reduce(s.buf, op=dist.ReduceOp.MAX, group=g)
    elif s.op == "reduce_scatter":
        dist.reduce_scatter_tensor(s.buf, s.inp, op=dist.ReduceOp.SUM, group=g)
    elif s.op == "all_gather":
        dist.all_gather_into_tensor(s.buf, s.inp, group=g)
    elif s.op == "broadcast":
        dist.broadcast(s.buf, src=glob(s.root), group=g)
    elif s.op == "all_to_all":
        dist.all_to_all_single(s.buf, s.inp, group=g)
    elif s.op == "sendrecv_ring":
        ops = [dist.P2POp(dist.isend, s.inp, glob((s.r + 1) % s.n), g),
               dist.P2POp(dist.irecv, s.buf, glob((s.r - 1) % s.n), g)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
