"""The live op log: which ATen ops a step ran, in order, with their tensors' dtypes and shapes.

Full op capture (capture.py) sees every op's values but costs a Python call and a hash per op (about
10x a 3 ms step of small ops, 2x on one of real GEMMs). The live part of the flight recorder's capture
is this log instead, kept by a C++ RecordFunction callback (oplog.cpp, compiled on first use with
torch.utils.cpp_extension: a C++ compiler and ninja are needed, about 20 s once, cached after) at
about 1.3 us an op (1.29x with the snapshot on the tiny GPT, 1.05x on the bench GPT: docs/reproducers.md
"Numbers"); the values come from re-executing the step's snapshot under full capture, and comparing
the two logs says whether that re-execution ran the step that ran live (same ops, same shapes, in the
same order on each thread), or where it went another way.

    with oplog.recording() as log:
        step()
    log.result.ops[0].line()   # '#0 aten::embedding(Float[256, 64], Long[8, 32])'
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

_SOURCE = Path(__file__).with_name("oplog.cpp")


class OpLogUnavailable(RuntimeError):
    """The C++ op log cannot be built here (no compiler, no ninja, no Python headers)."""


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    for tool, hint in (("ninja", "pip install ninja"), ("c++", "install a C++ compiler, e.g. apt install g++")):
        if shutil.which(tool) is None:
            raise OpLogUnavailable(f"the live op log is compiled on first use and needs {tool}: {hint}")
    try:
        # the torch version in the name: a build for another torch is never loaded against this one
        name = "chipcheck_oplog_" + torch.__version__.replace(".", "_").replace("+", "_")
        return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=["-O2", "-DNDEBUG"], verbose=False)
    except Exception as e:  # a compiler error is many lines; the first says what is missing
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise OpLogUnavailable(f"the live op log could not be built: {first}") from e


_extension = functools.cache(_build)


def available() -> str | None:
    """None when the op log can be kept here (building it if needed); else why not, in one line."""
    try:
        _extension()
    except OpLogUnavailable as e:
        return str(e)
    return None


@dataclass(frozen=True, slots=True)
class LoggedOp:
    index: int
    name: str
    thread: int
    """The thread's index in order of first appearance in the log (backward runs elsewhere on GPUs)."""
    inputs: tuple[Any, ...]
    """Per tensor argument (dtype, shape); None for an undefined tensor; a list of those for a tensor
    list; shape "nested" for a nested tensor; the one string "unreadable" when torch could not say."""

    def line(self) -> str:
        def one(t: Any) -> str:
            if t is None or isinstance(t, str):
                return str(t)
            if isinstance(t, list):
                return "[" + ", ".join(map(one, t)) + "]"
            dtype, shape = t
            return f"{dtype}[{', '.join(map(str, shape))}]" if isinstance(shape, tuple) else f"{dtype} {shape}"
        return f"#{self.index} {self.name}({', '.join(map(one, self.inputs))})" + \
            (f" on thread {self.thread}" if self.thread else "")


@dataclass(frozen=True, slots=True, eq=False)
class OpLog:
    """One step's ops as the callback kept them: compact arrays, decoded one op at a time."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    """c10's names of the scalar types, by value ('Float', 'BFloat16', ...)."""
    name: np.ndarray
    thread: np.ndarray
    offset: np.ndarray
    codes: np.ndarray

    def __len__(self) -> int:
        return len(self.name)

    def op(self, i: int) -> LoggedOp:
        codes = self.codes[self.offset[i]:self.offset[i + 1]].tolist()
        pos = 0

        def tensor() -> Any:
            nonlocal pos
            c = codes[pos]
            pos += 1
            if c == -2:
                return None
            dt = -100 - c
            dtype = self.dtypes[dt] if dt < len(self.dtypes) else f"scalar type {dt}"
            nd = codes[pos]
            if nd < 0:  # a nested tensor: no one shape
                pos += 1
                return (dtype, "nested")
            shape = tuple(codes[pos + 1:pos + 1 + nd])
            pos += 1 + nd
            return (dtype, shape)

        inputs: list[Any] = []
        if codes == [-4]:
            inputs.append("unreadable")
            codes = []
        while pos < len(codes):
            if codes[pos] == -3:
                n = codes[pos + 1]
                pos += 2
                inputs.append([tensor() for _ in range(n)])
            else:
                inputs.append(tensor())
        return LoggedOp(index=i, name=self.names[self.name[i]], thread=int(self.thread[i]), inputs=tuple(inputs))

    @property
    def ops(self) -> list[LoggedOp]:
        return [self.op(i) for i in range(len(self))]

    def _key(self, i: int) -> tuple[str, int, bytes]:
        return self.names[self.name[i]], int(self.thread[i]), self.codes[self.offset[i]:self.offset[i + 1]].tobytes()

    def first_difference(self, other: OpLog) -> tuple[LoggedOp | None, LoggedOp | None] | None:
        """None when both logs ran the same ops; else the first op (of each log; None past its end)
        where they part. Each thread is compared on its own: threads may interleave differently."""
        for t in sorted(set(self.thread.tolist()) | set(other.thread.tolist())):
            mine = np.flatnonzero(self.thread == t)
            theirs = np.flatnonzero(other.thread == t)
            for a, b in zip(mine, theirs, strict=False):
                if self._key(int(a)) != other._key(int(b)):
                    return self.op(int(a)), other.op(int(b))
            if len(mine) != len(theirs):
                n = min(len(mine), len(theirs))
                return (self.op(int(mine[n])) if n < len(mine) else None,
                        other.op(int(theirs[n])) if n < len(theirs) else None)
        return None


@dataclass(frozen=True, slots=True)
class PathCheck:
    """Did a re-execution run the ops the live step ran? Written next to the recaptured trial."""

    live_ops: int
    ops: int
    live: LoggedOp | None = None
    here: LoggedOp | None = None
    same: bool = True

    @classmethod
    def of(cls, live: OpLog, here: OpLog) -> PathCheck:
        diff = live.first_difference(here)
        if diff is None:
            return cls(live_ops=len(live), ops=len(here))
        return cls(live_ops=len(live), ops=len(here), live=diff[0], here=diff[1], same=False)

    def line(self) -> str:
        if self.same:
            return f"same ops as the live step: {self.ops} top-level ATen ops, in order, same dtypes and shapes"
        live = self.live.line() if self.live else "(the live step had ended)"
        here = self.here.line() if self.here else "(this run had ended)"
        return (f"not the live step: it ran {self.ops} ops, the live step {self.live_ops}; "
                f"they part at live {live} vs here {here}")


class Recording:
    """What `recording()` yields: `result` is the log once the block is left."""

    result: OpLog | None = None


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    ext = _extension()
    rec = Recording()
    # a profiler running now must still see the ops nested in the logged ones (oplog.cpp)
    ext.start(bool(torch._C._autograd._profiler_enabled()))
    try:
        yield rec
    finally:
        names, dtypes, name, thread, offset, codes = ext.stop()
        rec.result = OpLog(names=tuple(names), dtypes=tuple(dtypes), name=np.frombuffer(name, dtype=np.int32),
                           thread=np.frombuffer(thread, dtype=np.int32),
                           offset=np.frombuffer(offset, dtype=np.int64), codes=np.frombuffer(codes, dtype=np.int64))
