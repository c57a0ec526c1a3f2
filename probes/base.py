"""The probe interface, its registry and the context the harness hands to a probe.

The harness (fleet.worker) owns seeding, the watchdog, timing discipline and storage; a probe
measures and checks, and returns typed `CaseOutcome`s. Probes never decide `slow`: that is a
fleet judgement over many devices.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..results import ErrorInfo, LinkResult, Mismatch, Verdict
from .keeping import Kept


class ProbeError(Exception):
    """A probe could not run (as opposed to: it ran and the chip was wrong)."""


class InvalidConfig(ProbeError):
    pass


class Unsupported(ProbeError):
    """The device lacks what this case needs (e.g. fp8 on a chip without fp8 units)."""


@dataclass(slots=True)
class CaseOutcome:
    """What a probe measured and saw for one case; the harness stamps host/device/run on it."""

    case: str
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    repeats: int = 0
    repeats_bad: int = 0
    nondeterministic: bool = False
    output_hash: str = ""
    repeat_hashes: list[str] = field(default_factory=list)
    """Each repeat's hash, kept when the repeats disagree and no oracle failed (`nondeterministic`): the
    fleet's consensus then tells a device wrong in every repeat from one wrong in some."""
    error: ErrorInfo | None = None
    links: list[LinkResult] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list, repr=False, compare=False)
    """While the case runs: what `keeping.keep` tracks of the mismatches it kept (never reported)."""

    @property
    def verdict(self) -> Verdict:
        """Local verdict: wrong in every repeat -> wrong; in some -> flaky; bits differ with no
        oracle able to say which is right -> flaky (nondeterminism)."""
        if self.error is not None:
            return Verdict.ERROR
        if self.repeats_bad and self.repeats_bad >= self.repeats:
            return Verdict.WRONG
        if self.repeats_bad or self.nondeterministic:
            return Verdict.FLAKY
        if self.mismatches:
            return Verdict.WRONG
        return Verdict.PASS


class Timer:
    """Times device work: CUDA events on GPUs; on single-threaded CPU devices, the CPU seconds.

    A virtual CPU device is a process sharing cores with others; wall time would charge it for
    its neighbours' load. The compute thread's CPU time measures what the device itself spent,
    so a busy host never makes a device look slow, while a slow core still does.
    `exclusive` optionally serialises timed sections across processes.
    """

    def __init__(self, device: Any, exclusive: Callable[[], contextlib.AbstractContextManager[Any]] | None = None):
        self.device = device
        self._exclusive = exclusive or contextlib.nullcontext

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._exclusive():
            yield

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run `fn` once; return (its result, seconds)."""
        import torch

        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1e3
        if self.device.type == "cpu" and torch.get_num_threads() == 1:
            # One compute thread: its CPU seconds are the device's. (With several, idle OpenMP
            # threads spin and bill CPU time that is no device's work: wall time is used then.)
            t0 = time.thread_time()
            out = fn()
            return out, max(time.thread_time() - t0, 1e-9)
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0


@dataclass(slots=True)
class ProbeContext:
    """Everything a probe may touch: its device, the seed, the profile, the fault injector."""

    device: Any  # torch.device
    device_kind: str
    seed: int
    profile: str
    timer: Timer
    under_test: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    deadline: float | None = None  # monotonic time by which a time-budgeted probe must stop
    capabilities: frozenset[str] = frozenset()
    rank: int = 0
    world_size: int = 1
    group: Callable[[], Any] | None = None
    """Returns the torch.distributed default group (initialised on first call) for collective probes."""
    host: str = ""
    host_lock: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    """Serialises timed work of devices sharing a host's CPU (collective probes take it per measurement)."""
    options: dict[str, str] = field(default_factory=dict)
    """Probe options from the command line (e.g. links: pairing=random:15)."""


class Probe(abc.ABC):
    """A deterministic workload with its checkers. Subclasses nest a frozen `Config` dataclass."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    """Position in a default run (cheap, local probes first)."""
    default: ClassVar[bool] = True
    """Part of `chipcheck run` when --probes is not given."""
    min_devices: ClassVar[int] = 1
    """Devices the probe needs (collectives: 2); with fewer it is left out of a default run."""
    collective: ClassVar[bool] = False
    """Runs on all ranks together (needs ctx.group()); never serialised by the host lock."""
    speed_metric: ClassVar[str] = "tflops_best"
    """The metric (higher is better) the fleet compares to call a device slow."""
    speed_kernel: ClassVar[str] = "gemm"
    """The retest kernel (probes/retest.py) that confirms this probe's slow suspects: `gemm` for
    compute-bound probes, `copy` for memory-bound ones, '' where speed is judged elsewhere."""
    jax: ClassVar[str] = ""
    """The module of this package that runs the probe on JAX devices ('': torch only). It has
    `cases(cfg)` (the torch path's case names) and `run_case(device, cfg, case, seed, injector)`, or,
    for a collective probe, `run_ranks(devices, cfg, case, injectors)` (one outcome per rank)."""

    @abc.abstractmethod
    def config(self, profile: str, device_kind: str, capabilities: frozenset[str]) -> Any:
        """The Config for this profile and device kind."""

    @abc.abstractmethod
    def cases(self, cfg: Any) -> list[str]:
        """The case names this config runs, in order (each is run, stored and judged alone)."""

    @abc.abstractmethod
    def run_case(self, ctx: ProbeContext, cfg: Any, case: str) -> CaseOutcome:
        """Run one case on ctx.device; the only code that touches the device."""


def profile_table(probe: str, profile: str, device_kind: str) -> dict[str, Any]:
    """The `[device_kind.profile]` table of probes/profiles/<probe>.toml (ROCm uses the cuda rows).

    Shapes live in data files, fixed per (profile, device kind): every device of one fingerprint
    computes the same thing, so fleet consensus can compare their bits.
    """
    import tomllib
    from importlib import resources

    try:
        text = resources.files("chipcheck.probes").joinpath("profiles", f"{probe}.toml").read_text()
    except FileNotFoundError:
        raise InvalidConfig(f"probe {probe!r} has no profiles/{probe}.toml") from None
    table = tomllib.loads(text)
    kind = device_kind if device_kind in table else "cuda" if device_kind == "rocm" else "cpu"
    if kind not in table or profile not in table[kind]:
        raise InvalidConfig(f"{probe}: no {profile!r} profile for {device_kind} devices")
    return dict(table[kind][profile])


_REGISTRY: dict[str, type[Probe]] = {}


def register(name: str) -> Callable[[type[Probe]], type[Probe]]:
    def deco(cls: type[Probe]) -> type[Probe]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registry() -> dict[str, type[Probe]]:
    """Registered probes by name, in registration order (built-in probe modules imported first).

    Every module of this package that defines a probe registers it on import; modules whose
    name starts with an underscore, and the helpers listed in `_NOT_PROBES`, are not probes.
    """
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(_package_path()):
        if not mod.name.startswith("_") and mod.name not in _NOT_PROBES:
            importlib.import_module(f"{__package__}.{mod.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda kv: kv[1].order))


_NOT_PROBES = {"base", "faults"}


def is_collective(name: str) -> bool:
    """Whether the registered probe `name` runs on all ranks together (False for an unknown name)."""
    cls = registry().get(name)
    return bool(cls and cls.collective)


def _package_path() -> list[str]:
    import os

    return [os.path.dirname(__file__)]


def get(name: str) -> Probe:
    reg = registry()
    if name not in reg:
        raise InvalidConfig(f"unknown probe {name!r}; known: {', '.join(sorted(reg))}")
    return reg[name]()
