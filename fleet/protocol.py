"""The worker protocol: typed messages between a supervisor and the processes doing the work.

One JSON object per line, `{"t": TAG, ...fields}`. Worker processes (fleet.worker for torch, the
JAX host process of fleet.jax_runner) write theirs on the result channel (`open_channel`); the
local launcher writes its control messages on the worker's stdin. A line that is not one of these
messages (a library's stray print on a shared pipe) is not ours and is skipped, never fatal.

Worker -> supervisor: Hello (started; its settings, and the devices when the supervisor cannot know
them), Usage (the plan cannot run here: a one-line reason), Wait (a case queues for the host's CPU
timing lock), Start (a case runs: its watchdog starts), Progress (the answer to ProgressQuery),
Result, Barrier / Synced (a multi-host JAX job waits for its other hosts), Bye.
Supervisor -> worker: PeerLost (a rank of the group is gone), ProgressQuery (how many collective
ops has this rank entered in its case).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import IO, Any, ClassVar

from ..results import DeviceInfo, ProbeResult


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    tag: ClassVar[str] = "hello"
    pid: int
    ranks: list[int] = field(default_factory=list)
    """The global ranks this process works for (one for a torch worker; a JAX host's local ranks)."""
    settings: dict[str, Any] = field(default_factory=dict)
    devices: list[DeviceInfo] = field(default_factory=list)
    """Every device of the job, where only the worker can tell them (JAX); empty otherwise."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    tag: ClassVar[str] = "usage"
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Wait:
    tag: ClassVar[str] = "wait"
    probe: str
    case: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    tag: ClassVar[str] = "start"
    probe: str
    case: str
    ranks: list[int] = field(default_factory=list)
    """The ranks the case occupies, where a process works for several (JAX); empty: the sender's."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    tag: ClassVar[str] = "progress"
    ops: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    tag: ClassVar[str] = "result"
    result: ProbeResult


@dataclass(frozen=True, slots=True, kw_only=True)
class Barrier:
    tag: ClassVar[str] = "barrier"
    name: str
    cases: int
    """How many per-device cases the other hosts may still be behind this one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Synced:
    tag: ClassVar[str] = "synced"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    tag: ClassVar[str] = "bye"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerLost:
    tag: ClassVar[str] = "peer_lost"
    rank: int
    why: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressQuery:
    tag: ClassVar[str] = "progress?"


Message = Hello | Usage | Wait | Start | Progress | Result | Barrier | Synced | Bye | PeerLost | ProgressQuery
_BY_TAG: dict[str, Any] = {c.tag: c for c in (Hello, Usage, Wait, Start, Progress, Result, Barrier, Synced, Bye,
                                               PeerLost, ProgressQuery)}


def encode(msg: Message) -> str:
    """One line (without its newline)."""
    d: dict[str, Any] = {"t": msg.tag}
    for f in fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, ProbeResult):
            v = v.to_dict()
        elif f.name == "devices":
            v = [x.to_dict() for x in v]
        d[f.name] = v
    return json.dumps(d)


def decode(line: str | bytes) -> Message | None:
    """The message on this line, or None when the line is not one of ours (or not well formed)."""
    try:
        d = json.loads(line)
        cls = _BY_TAG[d.pop("t")]
        if cls is Result:
            d["result"] = ProbeResult.from_dict(d["result"])
        elif cls is Hello:
            d["devices"] = [DeviceInfo.from_dict(x) for x in d.get("devices", [])]
        msg: Message = cls(**d)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return msg


def messages(lines: Iterable[str | bytes]) -> Iterable[Message]:
    """The protocol messages among these lines (the others skipped)."""
    for line in lines:
        msg = decode(line)
        if msg is not None:
            yield msg


def pump(stream: Iterable[bytes], put: Callable[[Message | None], None]) -> None:
    """Every message read from a worker's stream goes to `put`; then None (the stream ended)."""
    with contextlib.suppress(OSError, ValueError):  # the pipe closed under us: the run is ending
        for msg in messages(stream):
            put(msg)
    put(None)


def open_channel() -> IO[str]:
    """A worker's result stream (the launcher's fd $CHIPCHECK_RESULT_FD, else a copy of stdout);
    stdout itself then points at stderr."""
    fd = int(os.environ.get("CHIPCHECK_RESULT_FD", "-1"))
    if fd < 0:
        # Standalone: keep stdout for results and send everything else to stderr.
        fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the result stream
    return os.fdopen(fd, "w", buffering=1)


class Sender:
    """Writes messages on a stream, one whole line at a time (a worker's control thread answers on
    the same stream as its main thread)."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, msg: Message) -> None:
        line = encode(msg) + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()
