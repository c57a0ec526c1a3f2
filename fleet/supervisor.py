"""What every supervisor of child processes needs, written once: the local launcher (one worker per
device, fleet/launch.py) and the JAX supervisor (one host process for all devices, fleet/jax_runner.py)
both start their children here, read their typed messages, end them, say how they ended, and record
the cases they never reached.

- `spawn`: a child in its own process group (so it is killed with whatever it started), its stderr to
  a log, its stdout read by a thread that hands every worker message (`protocol`) to a callback, and
  None at end of file: the one signal that the child is gone.
- `kill_group`, `exit_text`, `log_tail`: end a child and say how it ended, with the end of its log.
- `not_run`: the error results of cases a lost child never reached; `lost_in`: the case a child was
  lost in and the rest of that probe there (later probes go to a fresh child).
- `interrupt_on_signals`: SIGTERM and SIGHUP end a run like Ctrl-C, so the `finally`s that kill
  the children run and the run is stored as interrupted.
- `Watch`: where a child is in its run (starting, between cases, queued for the host lock, in a
  case, at a barrier of its job, leaving) and since when: the one state machine every watchdog reads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

from ..results import DeviceInfo, ErrorKind, ProbeResult
from . import protocol
from .harness import error_result

STARTUP_TIMEOUT_S = 180.0  # importing torch or JAX and initialising a device on a loaded host
EXIT_GRACE_S = 60.0  # after `bye`: leaving a multi-host job waits for the other processes to leave too


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM/SIGHUP reached the run: workers are killed and the run is stored as interrupted."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `RunInterrupted` like Ctrl-C raises KeyboardInterrupt, so the
    `finally`s that kill the workers run (the main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_it(signum: int, _frame: Any) -> None:
        raise RunInterrupted(signum)

    old = {s: signal.signal(s, raise_it) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, without the result channel of an outer chipcheck (a
    child reports on its own stdout) and with `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k != "CHIPCHECK_RESULT_FD"}
    env.update(extra or {})
    return env


def spawn(cmd: list[str], *, env: Mapping[str, str], log: IO[bytes], on_message: Callable[
          [subprocess.Popen[bytes], protocol.Message | None], None], stdin: int = subprocess.PIPE
          ) -> subprocess.Popen[bytes]:
    """Start `cmd` in a process group of its own (stderr to `log`) and a thread that hands each of its
    stdout messages to `on_message(proc, msg)`, then `(proc, None)` when the child's stdout ends
    (the proc tells a restarted child's late messages from its successor's)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=stdin, env=dict(env),
                            start_new_session=True)
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=protocol.pump, args=(out, lambda msg: on_message(proc, msg)), daemon=True).start()
    return proc


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child started with start_new_session, and whatever it started, if still running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def exit_text(code: int) -> str:
    """A child's return code as people read it: "signal 9" or "exit 1"."""
    return f"signal {-code}" if code < 0 else f"exit {code}"


def log_tail(path: str | os.PathLike[str], lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            return tail_of(f.fileno(), lines)
    except OSError:
        return ""


def tail_of(fd: int, lines: int = 3, limit: int = 8192) -> str:
    """The last lines of an open file, read without moving its offset (the child still writes it)."""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, limit, max(0, size - limit))
    except OSError:
        return ""
    text = data.decode(errors="replace").strip().splitlines()
    return " | ".join(t.strip() for t in text[-lines:])


def not_run(run_id: str, seed: int, info: DeviceInfo, rank: int, probe: str, cases: list[str], kind: ErrorKind,
            why: str) -> list[ProbeResult]:
    """The results of cases a lost child never reached: `error` of the loss's kind, "not run: why"."""
    return [error_result(run_id, seed, info, rank, probe, c, kind, f"not run: {why}") for c in cases]


def lost_in(run_id: str, seed: int, info: DeviceInfo, rank: int, probe: str, case: str, kind: ErrorKind,
            message: str, rest: list[str], child: str) -> list[ProbeResult]:
    """A child lost in `probe case` on `rank`: that case's error (the loss's kind, `message`), then the
    rest of the probe there, not run; later probes go to a fresh child."""
    return [error_result(run_id, seed, info, rank, probe, case, kind, message),
            *not_run(run_id, seed, info, rank, probe, rest, kind, f"{child} was lost in {probe} {case}")]


class Phase(Enum):
    STARTING = "starting"  # started, has not said hello
    IDLE = "idle"  # between cases: nothing to time
    WAITING = "waiting"  # queued for the host CPU timing lock before a case
    IN_CASE = "in case"
    BARRIER = "barrier"  # waiting for the job's other processes (multi-host JAX)
    LEAVING = "leaving"  # said bye: everything is reported


@dataclass
class Watch:
    """Where a child is in its run and since when. Its messages move it (`on`); `overdue` says its
    phase has outlived its limit: start-up (importing torch or JAX on a loaded host), one case's
    watchdog, a barrier's own limit, the grace for leaving a job. Between cases nothing is timed."""

    timeout_s: float
    phase: Phase = Phase.STARTING
    since: float = field(default_factory=time.monotonic)
    case: tuple[str, str] | None = None  # (probe, case) while WAITING or IN_CASE
    barrier: tuple[str, float] | None = None  # (name, limit) while at a BARRIER
    ranks: tuple[int, ...] = ()
    """The ranks the case occupies, where one child works for several (JAX); empty: the child's own."""

    def to(self, phase: Phase, case: tuple[str, str] | None = None, barrier: tuple[str, float] | None = None,
           ranks: tuple[int, ...] = ()) -> None:
        self.phase, self.case, self.barrier, self.ranks, self.since = phase, case, barrier, ranks, time.monotonic()

    def on(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Hello):
            self.to(Phase.IDLE)
        elif isinstance(msg, protocol.Wait):
            self.to(Phase.WAITING, (msg.probe, msg.case))
        elif isinstance(msg, protocol.Start):
            self.to(Phase.IN_CASE, (msg.probe, msg.case), ranks=tuple(msg.ranks))
        elif isinstance(msg, protocol.Barrier):
            # the other hosts may still be at most `cases` per-device cases behind this one
            self.to(Phase.BARRIER, barrier=(msg.name, STARTUP_TIMEOUT_S + self.timeout_s * max(1, msg.cases)))
        elif isinstance(msg, protocol.Synced):
            self.to(Phase.IDLE)
        elif isinstance(msg, protocol.Bye):
            self.to(Phase.LEAVING)

    @property
    def current(self) -> tuple[str, str] | None:
        """The case it runs now."""
        return self.case if self.phase is Phase.IN_CASE else None

    @property
    def hello(self) -> bool:
        return self.phase is not Phase.STARTING

    def limit(self) -> float | None:
        return {Phase.STARTING: max(STARTUP_TIMEOUT_S, self.timeout_s), Phase.WAITING: self.timeout_s,
                Phase.IN_CASE: self.timeout_s, Phase.BARRIER: self.barrier[1] if self.barrier else None,
                Phase.LEAVING: EXIT_GRACE_S}.get(self.phase)

    def overdue(self, now: float) -> bool:
        limit = self.limit()
        return limit is not None and now - self.since > limit
