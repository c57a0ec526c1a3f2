"""One run's lifecycle in the results store, the same for every path that makes a run.

`chipcheck run` (fleet.runner, local workers), rank 0 of a torchrun/srun/Kubernetes job
(fleet.distributed), `chipcheck run --backend jax` (fleet.jax_runner) and `chipcheck ingest`
(fleet.ingest) each hold one `RunSession`:

    with RunSession(store, run_id, on_result=show) as run:   # SIGTERM/SIGHUP raise, like Ctrl-C
        run.begin(host=..., profile=..., seed=..., argv=..., config=...)
        run.add_devices(devs)
        ...  run.keep(result) for every result, the moment it exists
        summary = run.finish(judge)  # judgements, links, verdict: the run is complete

A run cut short (Ctrl-C, SIGTERM, SIGHUP: `KeyboardInterrupt`, see supervisor.interrupt_on_signals)
leaves the `with` marked `interrupted`, with everything kept so far, and the exception goes on,
so the caller's `finally`s (killing workers) run and the command exits non-zero. The session
neither launches nor judges: the path brings its own judge (fleet.runner.judge, with or without
the store's history), so the store sees the same writes, in the same order, from every path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from ..results import DeviceInfo, Judgement, ProbeResult, RunSummary
from .store import Store
from .supervisor import interrupt_on_signals

Judge = Callable[[list[ProbeResult]], tuple[RunSummary, list[Judgement]]]
"""A path's fleet analysis: results in, the run's summary and per-device judgements out."""


class RunSession:
    """One run in `store`: begun, its results kept as they arrive, judged and ended, or marked
    `interrupted` when a signal or Ctrl-C ends it first (as a context manager)."""

    def __init__(self, store: Store, run_id: str, *, on_result: Callable[[ProbeResult], None] | None = None):
        self.store = store
        self.run_id = run_id
        self.on_result = on_result
        self.results: list[ProbeResult] = []
        """Every result kept in this session, in the order they arrived."""
        self.ended = False
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> RunSession:
        stack = contextlib.ExitStack()
        stack.enter_context(interrupt_on_signals())
        self._signals = stack
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None and isinstance(exc, KeyboardInterrupt):
                self.interrupt()
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None

    def begin(self, *, host: str, profile: str, seed: int, argv: list[str], config: dict[str, Any],
              started: float | None = None) -> None:
        """Record the run (status `running`). Raises StoreError when the store cannot take it."""
        self.store.begin_run(self.run_id, host=host, profile=profile, seed=seed, argv=argv, config=config,
                             started=started)

    def add_devices(self, devs: Iterable[DeviceInfo] | Iterable[tuple[int, DeviceInfo]]) -> None:
        """The run's devices, by rank: a list in rank order, or (rank, device) pairs."""
        ranked = [x if isinstance(x, tuple) else (i, x) for i, x in enumerate(devs)]
        self.store.add_devices(self.run_id, ranked)

    def keep(self, r: ProbeResult) -> None:
        """Store one result the moment it exists, collect it, and hand it to `on_result`."""
        self.store.add_result(r)
        self.results.append(r)
        if self.on_result is not None:
            self.on_result(r)

    def keep_new(self, r: ProbeResult) -> bool:
        """`keep` a result not stored yet (from a shard, or another rank); False when it already was."""
        if self.store.has_result(r):
            return False
        self.keep(r)
        return True

    def finish(self, judge: Judge, results: list[ProbeResult] | None = None, *, again: bool = False) -> RunSummary:
        """Judge `results` (default: those kept), store the judgements and the link matrix, and end the
        run with its verdict. `again`: the run was judged before; those judgements are replaced."""
        summary, judgements = judge(self.results if results is None else results)
        if again:
            self.store.clear_judgements(self.run_id)
        self.store.add_judgements(self.run_id, judgements)
        if summary.links is not None:
            self.store.add_links(self.run_id, summary.links)
        self.store.end_run(self.run_id, summary.verdict)
        self.ended = True
        return summary

    def interrupt(self) -> None:
        """Mark the run `interrupted` (a run already ended keeps its verdict). Never raises."""
        if not self.ended:
            self.store.interrupt_run(self.run_id)
