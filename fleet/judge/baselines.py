"""Absolute speed baselines: a device far below its SKU's achievable throughput is `slow`.

Peer comparison cannot see a whole fingerprint group that is equally slow (a node power-capped or
mis-clocked); a per-SKU table can. The table (baselines.toml next to this module; a user file
overrides or extends it by SKU key) holds, per SKU, the spec-sheet peak and the fraction of it a
healthy chip reaches on the probe's workload: GEMM TFLOP/s per matmul dtype, memory copy GB/s and
collective bus GB/s. Every entry names its source. See docs/baselines.md.

Which measurements are compared (one figure per device and speed key, the best: noise only lowers
speed):
- matmul: `tflops_best` per dtype (the case prefix, "bfloat16/random" -> bfloat16), from cases whose
  smallest GEMM dimension is at least the entry's `gemm_min_n`;
- bandwidth: `gbps_best` of the `copy` case (read + write bytes, as the spec figure counts them);
- collectives: `busbw_gbps_best` of all_reduce / all_gather / reduce_scatter, when the largest message
  reached the entry's `min_bytes` and every device of the run is on one host (else the network limits).

Pure functions; nothing here reads the store or touches a device.
"""

from __future__ import annotations

import math
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ...results import DeviceInfo, DeviceKind, Judgement, ProbeResult, Verdict

__all__ = ["GEMM_DTYPES", "MIN_MEMORY_FRACTION", "Baseline", "BaselineError", "BaselineTable", "Figure",
           "Sample", "SpeedKey", "baseline_judgements", "best_speeds", "load", "parse", "speed_samples"]

GEMM_DTYPES = ("float32", "tf32", "bfloat16", "float16", "float8_e4m3fn")
"""Matmul dtypes a table may list (probes.matmul.ALL_DTYPES; kept here so loading imports no probe)."""
BUSBW_OPS = ("all_reduce_sum", "all_reduce_max", "all_gather", "reduce_scatter")
"""Collectives whose busbw approaches the link's per-direction bandwidth (nccl-tests doc/PERFORMANCE.md)."""
MIN_MEMORY_FRACTION = 0.85
"""A device showing less than this fraction of its SKU's memory (a MIG slice, a partitioned chip)
holds a fraction of the chip and matches no entry."""
SCHEMA = 1
_PACKAGE = "chipcheck.fleet.judge"
_SHIPPED = "baselines.toml"


class BaselineError(ValueError):
    """A baselines file that cannot be used; the one-line message names the file and the fix (exit 2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeedKey:
    """What one speed figure measures: a probe and its family (matmul dtype, `copy`, `busbw`)."""

    probe: str
    family: str
    metric: str
    """The result metric (higher is better) the figure is read from."""
    unit: str
    """How reasons print it: TFLOP/s or GB/s."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One device's figure for one speed key from one result."""

    rank: int
    key: SpeedKey
    value: float
    case: str
    size: int
    """What the entry's minimum applies to: the smallest GEMM dimension, the largest collective
    message in bytes, 0 where nothing is gated."""
    fingerprint: str = ""
    """The device's fingerprint in that run: its SKU and software (driver, CUDA, cuDNN, NCCL, torch)."""
    shape: tuple[int, ...] = ()
    """What the figure was measured on besides the device: the GEMM's (m, n, k), the copy's bytes per
    call, the collective's group size and message sizes. A profile's shapes are its own (an H200's bf16
    GEMM: 519-566 TFLOP/s at the quick profile's 4096, 733 at the burn-in's 8192)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    """A spec-sheet peak and the fraction of it a healthy chip reaches on the probe's workload."""

    peak: float
    achievable: float
    """Fraction of `peak` (0 < f <= 1): a floor a healthy chip clears, not its best case."""

    @property
    def expected(self) -> float:
        """The achievable figure: peak x achievable."""
        return self.peak * self.achievable


@dataclass(frozen=True, slots=True, kw_only=True)
class Baseline:
    """One SKU's achievable throughput, how devices are matched to it, and where the figures come from."""

    key: str
    """The table key (`[sku.<key>]`); a user file's entry with the same key replaces this one."""
    label: str
    """How reasons name the SKU ("H100 SXM")."""
    kinds: tuple[DeviceKind, ...]
    match: tuple[str, ...]
    """Substrings of the device name (case-insensitive); the longest match over the table wins."""
    exclude: tuple[str, ...] = ()
    """Substrings that veto a match ("GH200" for the H200 entry)."""
    memory_gb: float = 0.0
    """The SKU's memory in GB (0: not checked); a device with under MIN_MEMORY_FRACTION of it does not match."""
    source: str
    note: str = ""
    gemm_min_n: int = 0
    """Matmul cases whose smallest dimension is below this are not compared."""
    gemm_tflops: Mapping[str, Figure] = field(default_factory=dict)
    """Per matmul dtype: the dense peak TFLOP/s and its achievable fraction."""
    memory_gbps: Figure | None = None
    busbw_gbps: Figure | None = None
    busbw_min_bytes: int = 0
    """Collective cases whose largest message is below this are not compared."""

    def figure(self, key: SpeedKey) -> Figure | None:
        """The figure this entry holds for `key`, or None."""
        if key.probe == "matmul":
            return self.gemm_tflops.get(key.family)
        if key.probe == "bandwidth" and key.family == "copy":
            return self.memory_gbps
        if key.probe == "collectives" and key.family == "busbw":
            return self.busbw_gbps
        return None

    def minimum_size(self, key: SpeedKey) -> int:
        return self.gemm_min_n if key.probe == "matmul" else self.busbw_min_bytes if key.probe == "collectives" else 0

    def matches(self, device: DeviceInfo) -> int:
        """Length of the longest `match` substring in the device's name (0: no match)."""
        if self.kinds and device.kind not in self.kinds:
            return 0
        if self.memory_gb and device.memory_bytes and device.memory_bytes < MIN_MEMORY_FRACTION * self.memory_gb * 1e9:
            return 0
        names = [n.lower() for n in {device.name, device.fingerprint_fields.get("sku", device.name)}]
        if any(x.lower() in n for x in self.exclude for n in names):
            return 0
        return max((len(m) for m in self.match for n in names if m.lower() in n), default=0)


@dataclass(frozen=True, slots=True)
class BaselineTable:
    """The baseline entries, in table order (a user file's entries after the shipped ones)."""

    entries: tuple[Baseline, ...]

    def get(self, key: str) -> Baseline | None:
        """The entry with this SKU key, or None."""
        return next((b for b in self.entries if b.key == key), None)

    def match(self, device: DeviceInfo) -> Baseline | None:
        """The entry for `device`: the longest matching name substring wins, then the later entry."""
        best, best_len = None, 0
        for b in self.entries:
            n = b.matches(device)
            if n and n >= best_len:
                best, best_len = b, n
        return best

    def merged(self, override: BaselineTable, *, origin: str = "<override>") -> BaselineTable:
        """This table with `override`'s entries replacing those of the same key (whole) or added at the end;
        `origin` names the override in error messages."""
        keys = {b.key for b in override.entries}
        out = BaselineTable(tuple(b for b in self.entries if b.key not in keys) + override.entries)
        _check_unique_matches(out.entries, f"baselines file {origin} (with the shipped table)")
        return out


# ---- loading --------------------------------------------------------------------------------------


def load(path: str | Path | None = None) -> BaselineTable:
    """The shipped table, with the entries of the user file at `path` (if given) replacing or extending it.

    Raises BaselineError with a one-line message when either file is unreadable or invalid."""
    text = resources.files(_PACKAGE).joinpath(_SHIPPED).read_text(encoding="utf-8")
    table = parse(text, origin=f"shipped {_SHIPPED}")
    if path is None:
        return table
    p = Path(path)
    try:
        user = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BaselineError(f"baselines file {p} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BaselineError(f"baselines file {p} cannot be read ({_one_line(str(e))})") from None
    return table.merged(parse(user, origin=str(p)), origin=str(p))


def parse(text: str, *, origin: str = "<string>") -> BaselineTable:
    """A table from TOML text, validated; `origin` names the file in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BaselineError(f"baselines file {origin}: not valid TOML ({_one_line(str(e))})") from None
    _keys(doc, {"schema", "sku"}, origin, "the top level")
    schema = doc.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise BaselineError(f"baselines file {origin}: schema {schema!r} is not supported (this chipcheck reads "
                            f"schema = {SCHEMA})")
    skus = doc.get("sku")
    if not isinstance(skus, dict) or not skus:
        raise BaselineError(f"baselines file {origin}: no [sku.<name>] entries")
    entries = tuple(_entry(key, body, origin) for key, body in skus.items())
    _check_unique_matches(entries, f"baselines file {origin}")
    return BaselineTable(entries)


_ENTRY_KEYS = {"label", "kind", "match", "exclude", "memory_gb", "source", "note", "gemm_min_n", "gemm_tflops",
               "memory_gbps", "busbw_gbps"}


def _entry(key: str, body: Any, origin: str) -> Baseline:
    where = f"baselines file {origin}: [sku.{key}]"
    if not isinstance(body, dict):
        raise BaselineError(f"{where} must be a table")
    _keys(body, _ENTRY_KEYS, origin, f"[sku.{key}]")
    for req in ("label", "kind", "match", "source"):
        if req not in body:
            raise BaselineError(f"{where} lacks `{req}` (every entry needs label, kind, match and source)")
    label, source, note = (_str(body, k, where) for k in ("label", "source", "note"))
    if not label or not source:
        raise BaselineError(f"{where}: `label` and `source` must not be empty")
    kinds_raw = body["kind"] if isinstance(body["kind"], list) else [body["kind"]]
    try:
        kinds = tuple(DeviceKind(k) for k in kinds_raw)
    except (ValueError, TypeError):
        raise BaselineError(f"{where}: kind {body['kind']!r} is not one of "
                            f"{', '.join(k.value for k in DeviceKind)}") from None
    match, exclude = _strings(body, "match", where), _strings(body, "exclude", where)
    if not match:
        raise BaselineError(f"{where}: `match` needs at least one device-name substring")
    gemm_raw = body.get("gemm_tflops", {})
    if not isinstance(gemm_raw, dict):
        raise BaselineError(f"{where}: gemm_tflops must be a table of dtype = {{ peak = ..., achievable = ... }}")
    gemm = {}
    for dtype, fig in gemm_raw.items():
        if dtype not in GEMM_DTYPES:
            raise BaselineError(f"{where}: gemm_tflops.{dtype} is not a matmul dtype ({', '.join(GEMM_DTYPES)})")
        gemm[dtype] = _figure(fig, f"{where} gemm_tflops.{dtype}")
    busbw, min_bytes = None, 0
    if "busbw_gbps" in body:
        raw = body["busbw_gbps"]
        if not isinstance(raw, dict):
            raise BaselineError(f"{where}: busbw_gbps must be {{ peak = ..., achievable = ..., min_bytes = ... }}")
        min_bytes = _count(raw.get("min_bytes", 0), f"{where} busbw_gbps.min_bytes")
        busbw = _figure({k: v for k, v in raw.items() if k != "min_bytes"}, f"{where} busbw_gbps")
    memory = _figure(body["memory_gbps"], f"{where} memory_gbps") if "memory_gbps" in body else None
    if not gemm and memory is None and busbw is None:
        raise BaselineError(f"{where} has no figures (give gemm_tflops, memory_gbps or busbw_gbps)")
    mem_gb = body.get("memory_gb", 0)
    if isinstance(mem_gb, bool) or not isinstance(mem_gb, int | float) or mem_gb < 0:
        raise BaselineError(f"{where}: memory_gb must be a number of GB >= 0, got {mem_gb!r}")
    return Baseline(key=key, label=label, kinds=kinds, match=match, exclude=exclude, memory_gb=float(mem_gb),
                    source=source, note=note, gemm_min_n=_count(body.get("gemm_min_n", 0), f"{where} gemm_min_n"),
                    gemm_tflops=gemm, memory_gbps=memory, busbw_gbps=busbw, busbw_min_bytes=min_bytes)


def _figure(raw: Any, where: str) -> Figure:
    if not isinstance(raw, dict) or set(raw) != {"peak", "achievable"}:
        raise BaselineError(f"{where} must be {{ peak = <number>, achievable = <fraction> }}, got {raw!r}")
    peak, frac = raw["peak"], raw["achievable"]
    for name, v in (("peak", peak), ("achievable", frac)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BaselineError(f"{where}: {name} must be a number, got {v!r}")
    if peak <= 0:
        raise BaselineError(f"{where}: peak must be > 0, got {peak!r}")
    if not 0 < frac <= 1:
        raise BaselineError(f"{where}: achievable is a fraction of peak in (0, 1], got {frac!r}")
    return Figure(peak=float(peak), achievable=float(frac))


def _keys(d: dict[str, Any], allowed: set[str], origin: str, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise BaselineError(f"baselines file {origin}: unknown key {unknown[0]!r} in {where} "
                            f"(known: {', '.join(sorted(allowed))})")


def _str(body: dict[str, Any], k: str, where: str) -> str:
    v = body.get(k, "")
    if not isinstance(v, str):
        raise BaselineError(f"{where}: `{k}` must be a string, got {v!r}")
    return v.strip()


def _strings(body: dict[str, Any], k: str, where: str) -> tuple[str, ...]:
    v = body.get(k, [])
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise BaselineError(f"{where}: `{k}` must be a list of non-empty strings, got {v!r}")
    return tuple(x.strip() for x in v)


def _count(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BaselineError(f"{where} must be an integer >= 0, got {v!r}")
    return v


def _check_unique_matches(entries: Iterable[Baseline], where: str) -> None:
    """Two entries claiming the same name substring would make matching depend on table order."""
    seen: dict[str, str] = {}
    keys: set[str] = set()
    for b in entries:
        if b.key in keys:
            raise BaselineError(f"{where}: SKU key {b.key!r} appears twice")
        keys.add(b.key)
        for m in b.match:
            other = seen.setdefault(m.lower(), b.key)
            if other != b.key:
                raise BaselineError(f"{where}: [sku.{b.key}] and [sku.{other}] both match {m!r}; "
                                    f"give one of them a longer substring")


def _one_line(s: str) -> str:
    return " ".join(s.split())


# ---- measurements ---------------------------------------------------------------------------------

_MATMUL_METRIC, _COPY_METRIC, _BUSBW_METRIC = "tflops_best", "gbps_best", "busbw_gbps_best"


def speed_samples(results: Iterable[ProbeResult]) -> Iterator[Sample]:
    """Every comparable speed figure in `results` (matmul per dtype, bandwidth copy, collective busbw);
    results that errored or carry no positive finite figure are skipped."""
    for r in results:
        if r.error is not None or r.verdict is Verdict.ERROR:
            continue
        if r.probe == "matmul":
            key = SpeedKey(probe="matmul", family=r.case.partition("/")[0], metric=_MATMUL_METRIC, unit="TFLOP/s")
            dims = [d for d in (r.params.get(x) for x in ("m", "n", "k")) if isinstance(d, int)]
            size = min(dims) if len(dims) == 3 else 0
            shape = tuple(dims)
        elif r.probe == "bandwidth" and r.case == "copy":
            key, size = SpeedKey(probe="bandwidth", family="copy", metric=_COPY_METRIC, unit="GB/s"), 0
            shape = (int(r.params.get("bytes_per_call") or 0),)
        elif r.probe == "collectives" and r.case.partition("/")[0] in BUSBW_OPS:
            key = SpeedKey(probe="collectives", family="busbw", metric=_BUSBW_METRIC, unit="GB/s")
            sizes = r.params.get("sizes") or [0]
            size = int(max(sizes))
            shape = (int(r.params.get("world_size") or 0), *(int(x) for x in sizes))
        else:
            continue
        v = r.metrics.get(key.metric)
        if v is not None and math.isfinite(v) and v > 0:
            yield Sample(rank=r.rank, key=key, value=float(v), case=r.case, size=size, fingerprint=r.fingerprint,
                         shape=shape)


def best_speeds(samples: Iterable[Sample]) -> dict[tuple[int, SpeedKey], Sample]:
    """The best sample per (rank, key): noise and interference only ever lower a speed."""
    best: dict[tuple[int, SpeedKey], Sample] = {}
    for s in samples:
        cur = best.get((s.rank, s.key))
        if cur is None or s.value > cur.value:
            best[(s.rank, s.key)] = s
    return best


# ---- judgement ------------------------------------------------------------------------------------


def baseline_judgements(results: list[ProbeResult], devices: dict[int, DeviceInfo], table: BaselineTable, *,
                        min_fraction: float = 0.9) -> list[Judgement]:
    """`slow` for every device whose best figure for a speed key is below `min_fraction` of its SKU's
    achievable figure; devices whose SKU is not in the table, and keys it has no figure for, are not judged.

    One judgement per (device, key), naming the case that gave the best figure; its reason says how
    far below, the achievable figure, the peak and fraction it comes from, and the source. When every
    judged device of a fingerprint is below, the reason says so (a node- or fleet-wide cause)."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    entry = {rank: table.match(d) for rank, d in devices.items()}
    one_host = len({d.host for d in devices.values()}) <= 1

    def comparable(s: Sample) -> bool:
        b = entry.get(s.rank)
        if b is None or b.figure(s.key) is None or s.size < b.minimum_size(s.key):
            return False
        return one_host or s.key.probe != "collectives"

    best = best_speeds(s for s in speed_samples(results) if comparable(s))
    below: dict[tuple[int, SpeedKey], tuple[Sample, Baseline, Figure, float]] = {}
    judged: dict[tuple[str, SpeedKey], int] = defaultdict(int)
    low: dict[tuple[str, SpeedKey], int] = defaultdict(int)
    for (rank, key), s in best.items():
        b = entry[rank]
        assert b is not None
        fig = b.figure(key)
        assert fig is not None
        ratio = s.value / fig.expected
        group = (devices[rank].fingerprint, key)
        judged[group] += 1
        if ratio < min_fraction:
            low[group] += 1
            below[(rank, key)] = (s, b, fig, ratio)
    out = []
    for (rank, key), (s, b, fig, ratio) in sorted(below.items(), key=lambda kv: (kv[0][0], kv[0][1].probe,
                                                                                  kv[0][1].family)):
        n = judged[(devices[rank].fingerprint, key)]
        whole = (f"; all {n} devices of its fingerprint are below it: look for a node- or fleet-wide cause "
                 f"(power cap, clocks, driver)" if n >= 2 and low[(devices[rank].fingerprint, key)] == n else "")
        what = key.family if key.probe == "matmul" else "memory copy" if key.probe == "bandwidth" else "collective busbw"
        reason = (f"{ratio:.0%} of the {b.label} {what} baseline: measured {s.value:.4g} {key.unit} in {s.case}, "
                  f"achievable {fig.expected:.4g} {key.unit} = {fig.achievable:.2f} x {fig.peak:g} peak "
                  f"(source: {b.source}; threshold {min_fraction:.2f} of achievable){whole}")
        unit = "tflops" if key.unit == "TFLOP/s" else "gbps"
        out.append(Judgement(rank=rank, probe=key.probe, case=s.case, verdict=Verdict.SLOW, reason=reason,
                             metrics={key.metric: s.value, f"baseline_{unit}": fig.expected,
                                      f"peak_{unit}": fig.peak, "achievable_fraction": fig.achievable,
                                      "ratio_to_baseline": ratio}))
    return out
