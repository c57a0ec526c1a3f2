"""Device memory pattern probe.

Catches: stuck and weak cells, coupling between neighbouring cells, address-decoder faults
(aliasing), bits that flip at rest -- faults that a one-shot GEMM on a small buffer never touches
because they sit in a corner of memory.

A buffer of 32-bit words (a large fraction of free device memory on GPUs; a bounded slice of
host memory on CPU workers) is written with a pattern and read back; every pattern is known in
closed form per word, so any differing bit is an error. Cases, each run `passes` times; every
pass checks a pattern *and its complement*, so a stuck bit shows in every pass:
- `walking`:    word i holds 1 << ((i + pass) % 32) (walking ones), then its complement (zeros).
- `address`:    word i holds its own byte address (address-in-address: aliasing shows as a
                word holding another word's address), then the complement.
- `random`:     counter-based random words (generator.hash_indices, seeded per pass).
- `inversions`: moving inversions (MATS+): write p; ascending: verify p, write ~p; descending:
                verify ~p, write p; verify p.
Reported: failing byte addresses within the tested buffer, flipped bit positions, stuck-at
direction, the MiB regions hit, and whether an address fails again in a later pass (a hard
fault) or once (a transient).

Backends: cupy RawKernels on CUDA (probes/cupy_kernels.py; the whole pattern is generated and
checked on the device); torch elsewhere, and on CUDA when cupy is missing or when a fault is
injected into this probe (the injector lands in ATen ops: the pattern writes go through
`aten.copy_` and the read-back through `aten.clone`, so `--inject stuck:...,op=clone,probe=memory`
corrupts what the probe reads, at a fixed `index=` address if given).
Cost: ~6 reads+writes of the buffer per pass and case; quick on CPU is 16 MiB (< 1 s per case).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from .. import generator as g
from ..results import Mismatch, Oracle
from .base import CaseOutcome, InvalidConfig, Probe, ProbeContext, profile_table, register

CASES = ("walking", "address", "random", "inversions")
BACKENDS = ("auto", "torch", "cupy")
WORD = 4  # bytes per tested word: addresses are byte offsets, word index * 4
MASK32 = 0xFFFFFFFF
LISTED = 8  # addresses listed per mismatch


@register("memory")
class MemoryProbe(Probe):
    speed_kernel = "copy"
    order = 30

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        mib: int = 16
        """Buffer size in MiB (0: use `fraction` of the device's free memory)."""
        fraction: float = 0.0
        """Fraction of free device memory to test when `mib` is 0 (GPUs)."""
        chunk_mib: int = 16
        """torch backend: words generated / read back per step (bounds the temporaries)."""
        passes: int = 2
        """Passes per case (each checks a pattern and its complement); failing addresses are
        compared across passes to tell a hard fault from a transient."""
        cases: tuple[str, ...] = CASES
        """Which pattern tests run."""
        backend: str = "auto"
        """auto: cupy on CUDA when installed (torch when a fault is injected), else torch."""
        max_records: int = 65536
        """Failing words kept per verify step for the diagnosis (all are counted)."""

    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Config:
        p = profile_table("memory", profile, device_kind)
        known = set(self.Config.__dataclass_fields__)
        unknown = set(p) - known
        if unknown:
            raise InvalidConfig(f"memory: unknown keys {sorted(unknown)} in profiles/memory.toml; known: {sorted(known)}")
        if "cases" in p:
            p["cases"] = tuple(p["cases"])
        cfg = self.Config(**p)
        validate(cfg)
        return cfg

    def cases(self, cfg: Config) -> list[str]:
        return list(cfg.cases)

    def run_case(self, ctx: ProbeContext, cfg: Config, case: str) -> CaseOutcome:
        if case not in CASES:
            raise InvalidConfig(f"unknown memory case {case!r}; known: {', '.join(CASES)}")
        words = buffer_words(cfg, ctx.device)
        backend = choose_backend(cfg, ctx)
        seed = ctx.seed ^ g.stream_id("memory/" + case)
        out = CaseOutcome(case=case, params={"bytes": words * WORD, "words": words, "passes": cfg.passes,
                                             "backend": backend, "word_bits": 32})
        errors = ErrorLog()
        t0 = time.perf_counter()
        if backend == "cupy":
            traffic = _run_cupy(ctx, cfg, case, words, seed, errors)
        else:
            traffic = _run_torch(ctx, cfg, case, words, seed, errors)
        elapsed = time.perf_counter() - t0
        out.repeats = cfg.passes
        out.repeats_bad = len(errors.bad_passes)
        out.metrics["time_ms"] = elapsed * 1e3
        out.metrics["gbps"] = traffic / elapsed / 1e9
        out.metrics["bad_reads"] = float(errors.bad_reads)
        out.metrics["bad_addresses"] = float(errors.distinct)
        out.metrics["repeating_addresses"] = float(errors.repeating())
        m = errors.mismatch(case, words)
        if m is not None:
            out.mismatches.append(m)
        return out


def validate(cfg: MemoryProbe.Config) -> None:
    for c in cfg.cases:
        if c not in CASES:
            raise InvalidConfig(f"memory: unknown case {c!r}; known: {', '.join(CASES)}")
    if cfg.backend not in BACKENDS:
        raise InvalidConfig(f"memory: backend must be one of {', '.join(BACKENDS)}, not {cfg.backend!r}")
    if cfg.mib < 0 or (cfg.mib == 0 and not 0.0 < cfg.fraction <= 0.95):
        raise InvalidConfig("memory: set mib > 0, or mib = 0 and 0 < fraction <= 0.95")
    if cfg.passes < 1 or cfg.chunk_mib < 1 or cfg.max_records < 1:
        raise InvalidConfig("memory: passes, chunk_mib and max_records must be >= 1")


def buffer_words(cfg: MemoryProbe.Config, device: Any) -> int:
    """Words to test: `mib`, or `fraction` of the free memory (rounded down to whole MiB)."""
    if cfg.mib:
        return cfg.mib * 2**20 // WORD
    if device.type != "cuda":
        raise InvalidConfig("memory: fraction-of-free-memory sizing needs a CUDA device; set mib for CPU")
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    mib = int(free * cfg.fraction) // 2**20
    if mib < 1:
        raise InvalidConfig(f"memory: {free / 2**20:.0f} MiB free on {device}; nothing to test")
    return mib * 2**20 // WORD


def choose_backend(cfg: MemoryProbe.Config, ctx: ProbeContext) -> str:
    from . import cupy_kernels

    injected = ctx.under_test is not contextlib.nullcontext
    if cfg.backend == "cupy":
        if not cupy_kernels.available(ctx.device):
            from .base import Unsupported

            raise Unsupported("memory backend cupy needs a CUDA device and cupy (pip install chipcheck[gpu])")
        return "cupy"
    if cfg.backend == "auto" and not injected and cupy_kernels.available(ctx.device):
        return "cupy"
    return "torch"


# ---- patterns ----------------------------------------------------------------------------


def pass_key(seed: int, case: str, s: int) -> int:
    """The 32-bit key of pass `s` of a random-pattern case (cupy kernels take the same key)."""
    return g.key(seed, f"memory/{case}/{s}")


def pattern_torch(kind: str, idx: Any, s: int, key: int) -> Any:
    """The words (uint32 held in int64) that pass `s` of `kind` puts at global word indices `idx`.

    The reference definition: bit-identical to `pattern()` in cupy_kernels._MEM_SRC and to
    `pattern_words` (which computes the same in int32 for speed).
    """
    if kind == "walking":
        return idx.new_ones(()) << ((idx + s) & 31)
    if kind == "address":
        a = idx * WORD
        return (a & MASK32) ^ (a >> 32)
    return g.hash_indices(key, idx)


_INT32_WORDS = 2**30  # below this word index, byte addresses fit 32 bits and int32 math suffices


def _signed(v: int) -> int:
    return v - 2**32 if v >= 2**31 else v


def pattern_words(kind: str, lo: int, hi: int, s: int, key: int, device: Any) -> Any:
    """Pattern words [lo, hi) as an int32 tensor (the bits of the uint32 words).

    int32 arithmetic wraps mod 2**32 like the uint32 kernel; logical right shifts are masked
    arithmetic shifts. 3-4x faster than the int64 reference on a CPU, which is what keeps the
    quick profile quick; above 2**30 words it falls back to the reference.
    """
    import torch

    if hi > _INT32_WORDS:
        idx = torch.arange(lo, hi, dtype=torch.int64, device=device)
        return pattern_torch(kind, idx, s, key).to(torch.int32)
    i = torch.arange(lo, hi, dtype=torch.int32, device=device)
    if kind == "walking":
        return i.new_ones(()) << ((i + s) & 31)
    if kind == "address":
        return i * WORD
    x = i * _signed(g.GOLDEN)
    x += _signed(key)
    x ^= (x >> 16) & 0xFFFF
    x *= _signed(g.MIX_M1)
    x ^= (x >> 15) & 0x1FFFF
    x *= _signed(g.MIX_M2)
    x ^= (x >> 16) & 0xFFFF
    return x


# ---- the error log ----------------------------------------------------------------------


@dataclass(slots=True)
class _Word:
    passes: set[int] = field(default_factory=set)
    rose: int = 0  # bits read 1 where 0 was written
    fell: int = 0  # bits read 0 where 1 was written
    first: tuple[int, int] = (0, 0)  # (expected, actual) of the first failing read


class ErrorLog:
    """Failing reads of one case, by byte address: what the mismatch and its note are built from."""

    def __init__(self, cap: int = 1 << 16):
        self.cap = cap
        self.words: dict[int, _Word] = {}
        self.bad_passes: set[int] = set()
        self.bad_reads = 0
        self.overflow = 0  # failing reads whose address was not kept (past `cap` addresses)
        self.hist: dict[int, int] = {}

    @property
    def distinct(self) -> int:
        return len(self.words) + self.overflow

    def add(self, s: int, seen: int, records: list[tuple[int, int, int]]) -> None:
        """`seen` failing reads in pass `s`, of which `records` = [(byte address, expected, actual)]."""
        if seen == 0:
            return
        self.bad_passes.add(s)
        self.bad_reads += seen
        self.overflow += seen - len(records)
        for addr, exp, act in records:
            x = (exp ^ act) & MASK32
            w = self.words.get(addr)
            if w is None:
                if len(self.words) >= self.cap:
                    self.overflow += 1
                    continue
                w = self.words[addr] = _Word(first=(exp & MASK32, act & MASK32))
            w.passes.add(s)
            w.rose |= x & act & MASK32
            w.fell |= x & exp & MASK32
            for b in range(32):
                if x >> b & 1:
                    self.hist[b] = self.hist.get(b, 0) + 1

    def repeating(self) -> int:
        """Addresses that failed in more than one pass (hard faults, not transients)."""
        return sum(1 for w in self.words.values() if len(w.passes) > 1)

    def stuck(self) -> list[str]:
        """`0xADDR:bB=V` for bits of addresses failing in 2+ passes that always failed one way (stuck at V)."""
        out = []
        for addr in sorted(self.words):
            w = self.words[addr]
            if len(w.passes) < 2:
                continue
            for b in range(32):
                if w.rose >> b & 1 and not w.fell >> b & 1:
                    out.append(f"{addr:#x}:b{b}=1")
                elif w.fell >> b & 1 and not w.rose >> b & 1:
                    out.append(f"{addr:#x}:b{b}=0")
        return out

    def mismatch(self, case: str, words: int) -> Mismatch | None:
        if not self.bad_reads:
            return None
        addrs = sorted(self.words)[:LISTED]
        exp = [self.words[a].first[0] for a in addrs]
        act = [self.words[a].first[1] for a in addrs]
        regions = sorted({a >> 20 for a in self.words})
        stuck = self.stuck()
        note = (f"bad_addresses={self.distinct} bad_reads={self.bad_reads} repeating={self.repeating()} "
                f"passes_bad={sorted(self.bad_passes)} first_addresses={[hex(a) for a in addrs]} "
                f"stuck={stuck[:LISTED]} regions_mib={regions[:LISTED]}")
        return Mismatch(oracle=Oracle.EXACT, tensor=f"memory/{case}", bad_elements=self.distinct,
                        total_elements=words, first_indices=[[a] for a in addrs],
                        tiles=[[r] for r in regions[:LISTED]], expected=[float(v) for v in exp],
                        actual=[float(v) for v in act], expected_bits=[format(v, "032b") for v in exp],
                        actual_bits=[format(v, "032b") for v in act], bit_histogram=dict(sorted(self.hist.items())),
                        max_abs_error=float(max(abs(e - a) for e, a in zip(exp, act, strict=True))),
                        note=note + " addresses=byte offsets in the tested buffer; tiles=MiB regions")


# ---- torch backend (CPU, and CUDA without cupy) ------------------------------------------


class _TorchBuffer:
    """The tested words, written and read back chunk by chunk through injectable ATen ops."""

    def __init__(self, ctx: ProbeContext, words: int, chunk_words: int, max_records: int):
        import torch

        self.ctx = ctx
        self.torch = torch
        self.words = words
        self.chunk = chunk_words
        self.max_records = max_records
        self.buf = torch.empty(words, dtype=torch.int32, device=ctx.device)
        # float32 view: the fault injector corrupts floating outputs, and copy_/clone of a view
        # moves the bits unchanged (no arithmetic touches them).
        self.fbuf = self.buf.view(torch.float32)
        self.traffic = 0  # bytes written + read
        self._cache: tuple[tuple[Any, ...], Any] | None = None

    def spans(self, descending: bool = False) -> list[tuple[int, int]]:
        s = [(lo, min(lo + self.chunk, self.words)) for lo in range(0, self.words, self.chunk)]
        return s[::-1] if descending else s

    def expected(self, kind: str, s: int, key: int, inv: bool, lo: int, hi: int) -> Any:
        # The last chunk's pattern is kept: its complement and its re-reads cost one op, not a hash
        # (a one-chunk buffer, the CPU profiles, generates each pattern once per pass).
        tag = (kind, s, key, lo, hi)
        if self._cache is None or self._cache[0] != tag:
            self._cache = (tag, pattern_words(kind, lo, hi, s, key, self.ctx.device))
        words = self._cache[1]
        return ~words if inv else words

    def write(self, lo: int, hi: int, words: Any) -> None:
        with self.ctx.under_test():
            self.fbuf[lo:hi].copy_(words.view(self.torch.float32))
        self.traffic += (hi - lo) * WORD

    def verify(self, lo: int, hi: int, want: Any, s: int, errors: ErrorLog) -> None:
        torch = self.torch
        with self.ctx.under_test():
            got = self.fbuf[lo:hi].clone()
        self.traffic += (hi - lo) * WORD
        got = got.view(torch.int32)
        if torch.equal(got, want):  # the common case, and the cheap one
            return
        bad = got != want
        n = int(bad.sum())
        if not n:
            return
        where = torch.nonzero(bad).reshape(-1)[: self.max_records]
        recs = list(zip(((where + lo) * WORD).cpu().tolist(),
                        (want[where].to(torch.int64) & MASK32).cpu().tolist(),
                        (got[where].to(torch.int64) & MASK32).cpu().tolist(), strict=True))
        errors.add(s, n, recs)


def _run_torch(ctx: ProbeContext, cfg: MemoryProbe.Config, case: str, words: int, seed: int,
               errors: ErrorLog) -> int:
    mem = _TorchBuffer(ctx, words, max(1, cfg.chunk_mib * 2**20 // WORD), cfg.max_records)
    kind = "random" if case == "inversions" else case
    with ctx.timer.exclusive():
        for s in range(cfg.passes):
            key = pass_key(seed, case, s)
            if case == "inversions":
                _moving_inversions_torch(mem, kind, s, key, errors)
                continue
            for inv in (False, True):
                # Write everything before reading anything: aliasing and retention need the whole
                # buffer to hold the pattern when a word is read back.
                for lo, hi in mem.spans():
                    mem.write(lo, hi, mem.expected(kind, s, key, inv, lo, hi))
                for lo, hi in mem.spans():
                    mem.verify(lo, hi, mem.expected(kind, s, key, inv, lo, hi), s, errors)
    return mem.traffic


def _moving_inversions_torch(mem: _TorchBuffer, kind: str, s: int, key: int, errors: ErrorLog) -> None:
    for lo, hi in mem.spans():
        mem.write(lo, hi, mem.expected(kind, s, key, False, lo, hi))
    for inv, descending in ((False, False), (True, True)):
        for lo, hi in mem.spans(descending):
            want = mem.expected(kind, s, key, inv, lo, hi)
            mem.verify(lo, hi, want, s, errors)
            mem.write(lo, hi, ~want)
    for lo, hi in mem.spans():
        mem.verify(lo, hi, mem.expected(kind, s, key, False, lo, hi), s, errors)


# ---- cupy backend (CUDA) -----------------------------------------------------------------


def _run_cupy(ctx: ProbeContext, cfg: MemoryProbe.Config, case: str, words: int, seed: int,
              errors: ErrorLog) -> int:
    import torch

    from . import cupy_kernels as ck

    buf = torch.empty(words, dtype=torch.int32, device=ctx.device)
    sink = ck.ErrorSink(cfg.max_records)
    traffic = 0
    kind = "random" if case == "inversions" else case
    for s in range(cfg.passes):
        key = pass_key(seed, case, s)
        if case == "inversions":
            ck.write_pattern(buf, kind, s, key, False)
            ck.moving_inversion(buf, kind, s, key, True, sink)
            ck.moving_inversion(buf, kind, s, key, False, sink)
            ck.verify_pattern(buf, kind, s, key, False, sink)
            traffic += 6 * words * WORD
        else:
            for inv in (False, True):
                ck.write_pattern(buf, kind, s, key, inv)
                ck.verify_pattern(buf, kind, s, key, inv, sink)
                traffic += 2 * words * WORD
        torch.cuda.synchronize(ctx.device)
        errors.add(s, *sink.drain())
    del buf
    return traffic
