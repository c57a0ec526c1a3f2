"""The on-disk form of a capture: a typed op log (JSON) and a content-addressed blob store.

Layout of a capture directory (one per step, shared by every rank):

    CAPTURE/rank<R>/capture.json   this rank's op log, environment and settings
    CAPTURE/blobs/<sha256>.z       raw bytes of one tensor in a zlib container (shared across ranks)

Argument encoding (JSON trees): a tensor argument is `{"t": VID}`, where VID names a live tensor
object during the step (an in-place op keeps its VID: replay mutates the same object, so aliasing
and mutation replay for free); dtypes, devices, process groups and reduce ops have their own tags;
everything else is a plain JSON scalar or list. Blobs are raw bytes, not pickles: a capture from a
user's machine is data, never code.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import xxhash

SCHEMA = "chipcheck.capture/1"


class CaptureError(ValueError):
    """A capture directory that cannot be read (the CLI prints it and exits 2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorMeta:
    """Everything about a tensor except its bytes."""

    shape: list[int]
    stride: list[int]
    dtype: str
    device: str
    storage_offset: int = 0
    storage: int = 0
    """Storage id within the capture: two tensors with one id alias each other."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorRef:
    """A tensor the step consumed but no recorded op produced (parameters, the batch): its bytes
    live in the blob store under `sha256`."""

    vid: int
    meta: TensorMeta
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OpRecord:
    """One ATen (or c10d) call, in the order the step made them."""

    index: int
    op: str
    """The overload, e.g. `aten.mm.default`, `c10d.allreduce_.default`."""
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[int | None]
    """VID per tensor output (None for a non-tensor output)."""
    out_meta: list[TensorMeta | None]
    fingerprints: list[str]
    """The hash (`Capture.fingerprint`) of each tensor output's bytes as the step produced them."""
    in_fingerprints: list[str] = field(default_factory=list)
    """Collectives only: the hash of each input tensor before the collective ran."""
    substituted: bool = False
    """Replay must not compute this op: its outputs are recorded values (random op, collective)."""
    collective: dict[str, Any] | None = None
    """Collectives: {"group": name, "ranks": [...], "rank": r, "world": w}."""
    stack: list[str] = field(default_factory=list)
    """Where in the user's code (file:line:function); stripped by `bundle --redact`."""
    recorded: list[str] = field(default_factory=list)
    """Substituted ops: SHA-256 of each output's bytes in the blob store (post-wait for collectives)."""


@dataclass(slots=True, kw_only=True)
class Capture:
    """One rank's recorded step."""

    rank: int
    world: int
    device: str
    ops: list[OpRecord]
    tensors: dict[int, TensorRef]
    env: dict[str, Any]
    settings: dict[str, Any]
    root: Path = Path(".")
    schema: str = SCHEMA
    fingerprint: str = "sha256"
    """The hash of `OpRecord.fingerprints`: "xxh3_64" since it exists (SHA-256 cost a fifth of a
    captured step); captures written before it carry none and mean "sha256"."""
    compiled_calls: int = 0
    """torch.compile'd graphs that ran inside the step: their fused kernels are not ATen ops, so their
    outputs are recorded only as inputs of the ops that read them, and never checked (0: none, or a
    capture from before this was counted)."""
    unrecorded: int = 0
    """Ops that ran on what capture cannot record (nested or sparse tensors, a quantized or prepacked
    weight): not replayed nor checked; their strided outputs are saved as inputs of the ops that read
    them. `unrecorded_why` names the first."""
    unrecorded_why: str = ""
    eager: bool = False
    """torch.compile was set aside for the step (`capture(..., eager=True)`): every kernel ran as an ATen
    op and is checked; its bits are the eager kernels', not the compiled step's."""

    def to_json(self) -> str:
        # shallow dicts, not dataclasses.asdict: its deep copy of every op's arguments cost more than
        # the step itself on a small model (the capture is written when the step ends)
        d = {"schema": self.schema, "fingerprint": self.fingerprint, "rank": self.rank, "world": self.world, "device": self.device,
             "env": self.env, "settings": self.settings, "compiled_calls": self.compiled_calls,
             "eager": self.eager, "unrecorded": self.unrecorded, "unrecorded_why": self.unrecorded_why,
             "tensors": [{"vid": t.vid, "meta": _meta(t.meta), "sha256": t.sha256} for t in self.tensors.values()],
             "ops": [{**{f: getattr(o, f) for f in _OP_FIELDS}, "out_meta": [_meta(m) for m in o.out_meta]}
                     for o in self.ops]}
        return json.dumps(d, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path) -> Capture:
        tensors = {}
        for t in d["tensors"]:
            ref = TensorRef(vid=t["vid"], meta=TensorMeta(**t["meta"]), sha256=t["sha256"])
            tensors[ref.vid] = ref
        ops = [OpRecord(**{**o, "out_meta": [TensorMeta(**m) if m else None for m in o["out_meta"]]})
               for o in d["ops"]]
        return cls(rank=d["rank"], world=d["world"], device=d["device"], ops=ops, tensors=tensors,
                   env=d["env"], settings=d["settings"], root=root, schema=d["schema"],
                   fingerprint=d.get("fingerprint", "sha256"), compiled_calls=int(d.get("compiled_calls", 0)),
                   eager=bool(d.get("eager", False)), unrecorded=int(d.get("unrecorded", 0)),
                   unrecorded_why=str(d.get("unrecorded_why", "")))


_OP_FIELDS = tuple(f.name for f in fields(OpRecord))
_META_FIELDS = tuple(f.name for f in fields(TensorMeta))


def _meta(m: TensorMeta | None) -> dict[str, Any] | None:
    return None if m is None else {f: getattr(m, f) for f in _META_FIELDS}


def rank_dirs(root: Path) -> list[Path]:
    """The per-rank capture folders of a capture directory, in rank order."""
    return sorted((p for p in root.glob("rank*") if (p / "capture.json").is_file()),
                  key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0)


def load(root: str | Path, rank: int | None = None) -> Capture:
    """Read one rank's capture (default: the lowest rank present); CaptureError with a fix-it."""
    root = Path(root)
    if not root.is_dir():
        raise CaptureError(f"{root}: not a capture directory (make one with `with capture({str(root)!r}):`)")
    dirs = rank_dirs(root)
    if not dirs:
        raise CaptureError(f"{root}: no rank*/capture.json inside; is this a chipcheck capture directory?")
    pick = dirs[0] if rank is None else root / f"rank{rank}"
    if pick not in dirs:
        raise CaptureError(f"{root}: no rank {rank} in this capture (ranks captured: "
                           f"{', '.join(p.name[4:] for p in dirs)})")
    try:
        d = json.loads((pick / "capture.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CaptureError(f"{pick / 'capture.json'}: unreadable ({e})") from None
    if d.get("schema") != SCHEMA:
        raise CaptureError(f"{pick}: schema {d.get('schema')!r}, expected {SCHEMA}")
    return Capture.from_dict(d, root)


def load_all(root: str | Path) -> list[Capture]:
    """Every rank's capture, in rank order."""
    first = load(root)
    return [first] + [load(root, int(p.name[4:])) for p in rank_dirs(Path(root))[1:]]


def save(cap: Capture) -> Path:
    """Write this rank's op log (atomic: a crashed writer leaves no half file)."""
    d = cap.root / f"rank{cap.rank}"
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / "capture.json", cap.to_json().encode())
    return d


# --- blobs ------------------------------------------------------------------------------------

def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(root: Path, data: bytes | memoryview) -> str:
    """Store `data` under its SHA-256 (once: ranks that hold identical parameters share a blob).

    Stored, not compressed (zlib level 0): this runs inside the captured step, where level 1 cost
    half the step's capture time to save 7% on float bytes; a bundle is compressed when it is made."""
    digest = sha256(data)
    path = root / "blobs" / f"{digest}.z"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, zlib.compress(data, 0))
    return digest


def get_blob(root: Path, digest: str) -> bytes:
    path = root / "blobs" / f"{digest}.z"
    try:
        data = zlib.decompress(path.read_bytes())
    except (OSError, zlib.error) as e:
        raise CaptureError(f"{path}: missing or corrupt blob ({e})") from None
    if sha256(data) != digest:
        raise CaptureError(f"{path}: content does not match its SHA-256 (the capture was altered)")
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --- tensors <-> bytes ------------------------------------------------------------------------

def host_contiguous(t: Any) -> Any:
    """`t` as a contiguous host tensor: `t` itself when it already is one (no copy, no dispatch)."""
    if t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return t
    return t.detach().resolve_conj().resolve_neg().contiguous().cpu()


def dims_in_memory(t: Any) -> tuple[int, ...] | None:
    """The order `t`'s dims are laid out in memory, outermost first, when `t` is a permuted dense
    tensor (attention's (b, h, s, d) view of (b, s, h, d) memory, a GEMM's transposed weight); None
    when it is row-major or not dense (a slice with gaps, an expanded view). Kernels choose their
    path, and a bad chip's fault its address, by this layout."""
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    if order == tuple(range(t.dim())) or t.is_contiguous() or not t.permute(order).is_contiguous():
        return None
    return order


def laid_out(t: Any, order: tuple[int, ...] | None) -> Any:
    """`t`'s values with its dims laid out in memory in `order` (see `dims_in_memory`)."""
    if order is None:
        return t
    return t.permute(order).contiguous().permute([order.index(d) for d in range(t.dim())])


def materialised(t: Any) -> bool:
    """Does `t`'s storage hold every element it addresses? (FSDP frees parameter storages with
    `resize_(0)` between uses: such a tensor has a shape but no bytes.)"""
    if t.numel() == 0:
        return True
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True) if s > 1)
    return t.untyped_storage().nbytes() >= (last + 1) * t.element_size()


def _borrow(flat: Any) -> memoryview:
    """The bytes of a contiguous host tensor, borrowed (valid while `flat` lives).

    Never `Tensor.numpy()`: it marks the storage non-resizable for good, and FSDP's `free_storage`
    (`storage.resize_(0)`) then fails in the user's step."""
    n = flat.numel() * flat.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(flat.data_ptr())).cast("B")


def tensor_bytes(t: Any) -> bytes:
    """The raw bytes of a tensor's elements in row-major order (host copy; b"" when the storage was
    freed: see `materialised`)."""
    if not materialised(t):
        return b""
    flat = host_contiguous(t)
    return bytes(_borrow(flat))


def tensor_from_bytes(data: bytes, shape: list[int], dtype: str, device: str = "cpu") -> Any:
    import torch

    dt = getattr(torch, dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    t = raw.view(torch.uint8 if dt == torch.bool else dt)
    if dt == torch.bool:
        t = t.to(torch.bool)
    return t.reshape(shape).to(device)


def flat_tensors(x: Any) -> list[Any]:
    """The tensors in nested lists and tuples, depth first: the order in which capture and replay alike
    number an op's tensor arguments."""
    import torch

    def walk(v: Any) -> list[Any]:
        if isinstance(v, (list, tuple)):
            return [t for y in v for t in walk(y)]
        return [v] if isinstance(v, torch.Tensor) else []

    return walk(x)


def is_p2p(op: str) -> bool:
    """A c10d point-to-point op (`c10d.send.default`, `c10d.recv_.default`, ...): two ranks, not a group."""
    return op.split(".")[1:2] in (["send"], ["recv_"], ["recv_any_source_"])


ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
"""ATen ops whose output holds whatever memory held: never fingerprinted by capture, never compared by
replay."""

FINGERPRINT = "xxh3_64"
"""The hash new captures fingerprint outputs with: a change-detector, not a seal (the blob store keeps
SHA-256), at a tenth of SHA-256's cost per byte on the hundreds of outputs of a step."""


def fingerprint(t: Any, algo: str = FINGERPRINT) -> str:
    """The hash (16 hex digits) of a tensor's bytes, hashed in place ("" for a freed storage)."""
    if not materialised(t):
        return ""
    flat = host_contiguous(t)  # held: the borrowed view is only valid while its tensor lives
    data = _borrow(flat)
    if algo == "xxh3_64":
        return xxhash.xxh3_64_hexdigest(data)
    if algo == "sha256":
        return hashlib.sha256(data).hexdigest()[:16]
    raise CaptureError(f"fingerprint {algo!r} is not known to this chipcheck (xxh3_64, sha256)")

