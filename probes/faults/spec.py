"""Fault specs: the `--inject` grammar (probes/faults/__init__.py), parsed into `Fault`s and checked
against the run they are for."""


from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

KINDS = ("bitflip", "stuck", "nan", "slow", "hang", "crash")
_KEYS = {
    "bitflip": {"bit", "rate", "index"},
    "stuck": {"bit", "rate", "value", "index"},
    "nan": {"rate", "index"},
    "slow": {"factor"},
    "hang": set(),
    "crash": set(),
}
_COMMON = {"rank", "probe", "dtype", "op", "after", "seed", "output", "count", "at", "peer", "scope", "every", "side",
           "after_s", "chance"}
SCOPES = ("probe", "process")
EPOCH_ENV = "CHIPCHECK_FAULT_EPOCH"
"""When the run began (time.time()), for `after_s`; the launcher sets it for its workers."""
# Probes whose code under test consumes its own kernels' outputs register here on import (see `at`).
CALL_TIME_PROBES: set[str] = set()
# The compute kernels a fault lands in by default: GEMMs and attention, not the checks' helpers.
DEFAULT_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_flash_attention_for_cpu", "convolution",
               # attention backward kernels (first output: dq), so faults also land in gradients
               "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
               "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward")


CHIP_FAULTS = {
    "bitflip-fp32-every-2nd": "bitflip:rank={r},bit=20,dtype=float32,every=2,scope=process",
    "bitflip-bf16": "bitflip:rank={r},bit=12,dtype=bfloat16,scope=process",
    "bitflip-fp16": "bitflip:rank={r},bit=12,dtype=float16,scope=process",
    "nan": "nan:rank={r},scope=process",
    "stuck-bit": "stuck:rank={r},bit=22,value=1,rate=0.01,scope=process",
    "warm-chip": "bitflip:rank={r},bit=20,after=200,scope=process",
    "recv-corrupt": "bitflip:rank={r},bit=3,op=allreduce_,side=recv,scope=process",
    "send-corrupt": "bitflip:rank={r},bit=3,op=allreduce_,scope=process",
}
"""What a bad chip does, as --inject specs for rank `{r}` (process scope: every kernel it runs): the
catalogue the blame tests and benchmarks/bench_blame.py cross with every default probe."""


class InjectSpecError(ValueError):
    """A malformed --inject spec (the CLI turns it into a one-line message and exit 2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    kind: str
    ranks: tuple[int, ...] | None = None
    bit: int | None = None
    rate: float | None = None
    value: int = 1
    factor: float = 1.0
    probe: str | None = None
    dtype: str | None = None
    op: str | None = None
    after: int = 0
    seed: int = 0
    index: int | None = None
    output: int | None = None
    count: int = 0  # matching calls corrupted after `after` (0: all)
    peer: int | None = None  # collectives: only sends to this rank
    at: str | None = None  # exit | call | None (by probe: CALL_TIME_PROBES)
    scope: str = "probe"  # probe: each probe's code under test; process: every kernel the rank runs
    every: int = 1  # hit every Nth matching call (after `after`)
    side: str = "send"  # c10d ops: corrupt what is sent, or what is received (recv)
    after_s: float = 0.0  # seconds of the run (since EPOCH_ENV) during which matching calls are spared
    chance: float = 1.0  # a call the fault would hit is hit with this probability (intermittent)

    def applies_to(self, rank: int, probe: str) -> bool:
        return (self.ranks is None or rank in self.ranks) and (self.probe is None or self.probe == probe)

    def spec(self) -> str:
        parts = []
        if self.ranks is not None:
            parts.append("rank=" + "|".join(str(r) for r in self.ranks))
        for k in ("bit", "rate", "index", "probe", "dtype", "op", "output"):
            v = getattr(self, k)
            if v is not None:
                parts.append(f"{k}={v}")
        if self.kind == "stuck":
            parts.append(f"value={self.value}")
        if self.kind == "slow":
            parts.append(f"factor={self.factor}")
        if self.after:
            parts.append(f"after={self.after}")
        if self.count:
            parts.append(f"count={self.count}")
        if self.at:
            parts.append(f"at={self.at}")
        if self.every > 1:
            parts.append(f"every={self.every}")
        if self.after_s:
            parts.append(f"after_s={self.after_s:g}")
        if self.chance < 1.0:
            parts.append(f"chance={self.chance:g}")
        if self.seed:
            parts.append(f"seed={self.seed}")
        if self.side != "send":
            parts.append(f"side={self.side}")
        if self.scope != "probe":
            parts.append(f"scope={self.scope}")
        return self.kind + (":" + ",".join(parts) if parts else "")


def unreachable(f: Fault, world: int, probes: Collection[str], ops: Collection[str] | None = None) -> str:
    """Why fault `f` can never fire in a run of `world` ranks running `probes`; "" when it can. A typo in
    a rank, a probe or an op name would otherwise give a clean run that says nothing of it. `ops`: the op
    names a backend without a dispatcher hook injects into (JAX's); None: any ATen or c10d operator."""
    outside = [r for r in (*(f.ranks or ()), *(() if f.peer is None else (f.peer,))) if r >= world]
    if outside:
        ranks = "its only rank is 0" if world == 1 else f"its ranks are 0-{world - 1}"
        return f"rank {outside[0]} is not in this run ({ranks})"
    if f.probe is not None and f.probe not in probes:
        return f"probe {f.probe!r} is not in this run (it runs {', '.join(probes)})"
    if f.op is not None and ops is not None and f.op not in ops:
        return f"op {f.op!r} is not one the JAX path injects into ({', '.join(ops)})"
    if f.op is not None and ops is None and not _known_op(f.op):
        return f"op {f.op!r} is no ATen or c10d operator (e.g. mm, addmm, _scaled_mm, allreduce_, send)"
    return ""


def never_fires(specs: Collection[str], world: int, probes: Collection[str], ops: Collection[str] | None = None) -> str:
    """The first `--inject` spec with a fault that can never fire (`unreachable`), said in one line; ""
    when every fault can. Both runners call it where they know the run's world and probes."""
    for spec in specs:
        for f in parse(spec):
            if why := unreachable(f, world, probes, ops):
                return f"--inject {spec!r}: {why}"
    return ""


def _known_op(name: str) -> bool:
    """Is `name` an operator (overload packet) the injector can match: ATen's, c10d's or functional c10d's."""
    import torch
    import torch.distributed  # noqa: F401  (registers the c10d operators)

    return any(hasattr(getattr(torch.ops, ns), name) for ns in ("aten", "c10d", "_c10d_functional"))


def parse(spec: str) -> list[Fault]:
    """Parse one or more ';'-separated fault specs; raise InjectSpecError with a fix-it hint."""
    faults = []
    for one in (s.strip() for s in spec.split(";")):
        if one:
            faults.append(_parse_one(one))
    if not faults:
        raise InjectSpecError(f"empty --inject spec {spec!r}; e.g. bitflip:rank=0,bit=20")
    return faults


def _parse_one(spec: str) -> Fault:
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise InjectSpecError(f"unknown fault kind {kind!r} in --inject {spec!r}; known: {', '.join(KINDS)}")
    kw: dict[str, Any] = {"kind": kind}
    allowed = _KEYS[kind] | _COMMON
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not v:
            raise InjectSpecError(f"--inject {spec!r}: expected key=value, got {item!r}")
        if k not in allowed:
            raise InjectSpecError(f"--inject {spec!r}: key {k!r} is not valid for {kind}; valid: "
                                  f"{', '.join(sorted(allowed))}")
        try:
            kw.update(_convert(k, v))
        except ValueError as e:
            raise InjectSpecError(f"--inject {spec!r}: bad value for {k}: {v!r} ({e})") from None
    if kind in ("bitflip", "stuck") and kw.get("bit") is None:
        raise InjectSpecError(f"--inject {spec!r}: {kind} needs bit=N (0 = least significant)")
    width = _WIDTH.get(kw.get("dtype") or "", 64)
    if kind in ("bitflip", "stuck") and kw["bit"] >= width:  # it could never fire: the run would just pass
        raise InjectSpecError(f"--inject {spec!r}: {kw['dtype']} has bits 0..{width - 1}; bit={kw['bit']} "
                              "would never corrupt anything")
    if kind == "slow" and kw.get("factor", 1.0) <= 1.0:
        raise InjectSpecError(f"--inject {spec!r}: slow needs factor > 1, e.g. factor=1.3")
    if kind == "stuck" and kw.get("rate") is None:
        kw["rate"] = 1e-3
    if kw.get("scope") == "process" and kw.get("probe"):
        raise InjectSpecError(f"--inject {spec!r}: scope=process acts on every kernel of the rank; drop probe= "
                              "(or use scope=probe to fault one probe)")
    if kw.get("side") == "recv" and not kw.get("op"):
        raise InjectSpecError(f"--inject {spec!r}: side=recv needs a collective op, e.g. op=allreduce_")
    return Fault(**kw)


_WIDTH = {"float32": 32, "bfloat16": 16, "float16": 16, "float64": 64, "float8_e4m3fn": 8}
"""The dtypes `dtype=` accepts, with their bits per element."""


def _convert(k: str, v: str) -> dict[str, Any]:
    if k == "rank":
        ranks = tuple(int(x) for x in v.split("|"))
        if any(r < 0 for r in ranks):
            raise ValueError("ranks are >= 0")
        return {"ranks": ranks}
    if k == "count":
        if int(v) < 1:
            raise ValueError("count must be >= 1 (leave it out to corrupt every matching call)")
        return {"count": int(v)}
    if k == "at":
        if v not in ("exit", "call"):
            raise ValueError("at must be exit or call")
        return {"at": v}
    if k == "scope":
        if v not in SCOPES:
            raise ValueError(f"scope must be {' or '.join(SCOPES)}")
        return {"scope": v}
    if k == "side":
        if v not in ("send", "recv"):
            raise ValueError("side must be send or recv")
        return {"side": v}
    if k == "every":
        if int(v) < 1:
            raise ValueError("every must be >= 1")
        return {"every": int(v)}
    if k == "peer":
        if int(v) < 0:
            raise ValueError("peer is a rank >= 0")
        return {"peer": int(v)}
    if k in ("bit", "after", "seed", "value", "index", "output"):
        n = int(v)
        if n < 0 or (k == "output" and n > 15) or (k == "bit" and n > 63) or (k == "value" and n not in (0, 1)):
            raise ValueError("out of range")
        return {k: n}
    if k == "rate":
        r = float(v)
        if not 0.0 < r <= 1.0:
            raise ValueError("rate must be in (0, 1]")
        return {"rate": r}
    if k == "factor":
        return {"factor": float(v)}
    if k == "chance":
        c = float(v)
        if not 0.0 < c <= 1.0:
            raise ValueError("chance is a probability in (0, 1]")
        return {"chance": c}
    if k == "after_s":
        t = float(v)
        if not 0.0 <= t < float("inf"):
            raise ValueError("after_s is a number of seconds >= 0")
        return {"after_s": t}
    if k == "dtype":
        if v not in _WIDTH:
            *rest, last = _WIDTH
            raise ValueError(f"dtype must be {', '.join(rest)} or {last}")
        return {"dtype": v}
    return {k: v}
