"""Multi-host JAX runs: which process of which job this is, and joining the job (jax.distributed).

JAX's model is one process per host, driving every device of that host; several hosts form one
job through `jax.distributed.initialize`, after which `jax.devices()` lists every device of the
job and one SPMD program (a collective over a global mesh) runs on all of them, each process
feeding and reading only its own devices. This module says which job this process belongs to
(`MultiHost`: the coordinator's "host:port", the number of processes, this process's id), from
arguments, from chipcheck's own environment variables, or from the cluster environments JAX
detects by itself (Slurm, Open MPI, Cloud TPU VMs and GKE TPU pods, Kubernetes), and joins it
(`initialize`).

Unlike `jax.distributed.initialize()` with no arguments, the spec resolved here never narrows
the process to one device: under Slurm or Open MPI JAX's own detection pins each process to the
GPU of its local task id (one process per device). chipcheck keeps one process per host (launch
one task per node, e.g. `srun --ntasks-per-node=1`), so `local_device_ids` stays None (every
device of the host) unless given.

Environment (all three or none):
  CHIPCHECK_JAX_COORDINATOR      "host:port" of process 0 (it serves the coordinator there)
  CHIPCHECK_JAX_NUM_PROCESSES    processes in the job (one per host)
  CHIPCHECK_JAX_PROCESS_ID       this process's id, 0 .. num_processes - 1

Order matters: `initialize` must run before anything starts a JAX backend (`jax.devices()`,
`jax_backend.init()`, any computation); JAX refuses otherwise and so does this module.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_COORDINATOR = "CHIPCHECK_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "CHIPCHECK_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CHIPCHECK_JAX_PROCESS_ID"
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)


class MultiHostSpecError(ValueError):
    """A multi-host spec that cannot describe a job (malformed address, id out of range, ...)."""


class MultiHostError(RuntimeError):
    """Joining the job failed (coordinator unreachable, called too late, already joined another job)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiHost:
    """One process's place in a multi-host JAX job; validated on construction."""

    coordinator: str
    """"host:port" where process 0 serves the coordinator ("[v6addr]:port" for IPv6)."""
    num_processes: int
    """Processes in the job: one per host."""
    process_id: int
    """This process's id, 0 .. num_processes - 1 (process 0 hosts the coordinator)."""
    local_device_ids: tuple[int, ...] | None = None
    """Devices this process drives; None: every device of the host (chipcheck's model)."""
    timeout_s: int = 300
    """How long to wait for every process to join (seconds)."""
    heartbeat_timeout_s: int = 100
    """After this long without a heartbeat a process counts as dead and the job fails (seconds)."""
    source: str = "arguments"
    """Where the spec came from ("arguments", "environment", "jax:slurm", ...), for messages."""

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source != "arguments" else ""
        for name in ("num_processes", "process_id", "timeout_s", "heartbeat_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise MultiHostSpecError(f"multi-host {name} must be an integer, got {v!r}{where}")
        if self.num_processes < 1:
            raise MultiHostSpecError(f"multi-host num_processes must be >= 1, got {self.num_processes}{where}")
        if not 0 <= self.process_id < self.num_processes:
            raise MultiHostSpecError(f"multi-host process_id {self.process_id} is out of range for "
                                     f"{self.num_processes} processes (0 .. {self.num_processes - 1}){where}")
        if self.timeout_s < 1 or self.heartbeat_timeout_s < 1:
            raise MultiHostSpecError(f"multi-host timeouts must be >= 1 s{where}")
        split_address(self.coordinator, where)
        ids = self.local_device_ids
        if ids is not None and (not ids or len(set(ids)) != len(ids) or
                                any(not isinstance(i, int) or i < 0 for i in ids)):
            raise MultiHostSpecError(f"multi-host local_device_ids must be distinct non-negative integers, "
                                     f"got {ids!r}{where}")

    @property
    def label(self) -> str:
        """"process 1 of 2 (coordinator 10.0.0.1:1234)", for messages."""
        return f"process {self.process_id} of {self.num_processes} (coordinator {self.coordinator})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MultiHost | None:
        """The spec in CHIPCHECK_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID; None when none is set."""
        env = os.environ if environ is None else environ
        given = {k: env[k].strip() for k in ENV_VARS if env.get(k, "").strip()}
        if not given:
            return None
        missing = [k for k in ENV_VARS if k not in given]
        if missing:
            raise MultiHostSpecError(f"{', '.join(sorted(given))} set but {', '.join(missing)} not: "
                                     f"a multi-host run needs all of {', '.join(ENV_VARS)}")
        return cls(coordinator=given[ENV_COORDINATOR], num_processes=_int(given, ENV_NUM_PROCESSES),
                   process_id=_int(given, ENV_PROCESS_ID), source="environment")

    @classmethod
    def detect(cls, methods: tuple[str, ...] | None = None) -> MultiHost | None:
        """The job JAX's own cluster detection finds (what `jax.distributed.initialize()` with no
        arguments would join): Open MPI, Slurm, GKE/GCE TPU, Kubernetes, in JAX's order (or the
        named `methods`, e.g. ("slurm",)). None outside any, and for a job of one process.

        JAX_COORDINATOR_ADDRESS and JAX_COORDINATOR_PORT override the detected coordinator, as in
        JAX. Opt-in methods (mpi4py) are used only when named.
        """
        try:
            from jax._src import clusters  # JAX's detection has no public API; this is what initialize() uses
        except ImportError:
            return None
        env: Any = None
        for c in clusters.ClusterEnv._cluster_types:
            wanted = c.name in methods if methods is not None else not c.opt_in_only_method
            if wanted and c.is_env_present():
                env = c
                break
        if env is None:
            return None
        source = f"jax:{env.name}"
        try:
            n, pid = int(env.get_process_count()), int(env.get_process_id())
            if n <= 1:
                return None
            addr = os.environ.get("JAX_COORDINATOR_ADDRESS") or env.get_coordinator_address(
                timeout_secs=300, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MultiHostSpecError(f"JAX detected a {env.name} job but could not read it: {first}") from None
        return cls(coordinator=str(addr), num_processes=n, process_id=pid, source=source)

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None) -> MultiHost | None:
        """chipcheck's variables if set, else JAX's cluster detection; None: a single-host run."""
        spec = cls.from_env(environ)
        return spec if spec is not None else cls.detect()


def split_address(address: str, where: str = "") -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6addr]:port"; MultiHostSpecError when malformed."""
    host, sep, port = str(address).strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ok = bool(sep and host and port.isdigit() and 0 < int(port) < 65536 and " " not in host
              and (":" not in host or address.strip().startswith("[")))
    if not ok:
        raise MultiHostSpecError(f"multi-host coordinator {address!r} is not host:port "
                                 f"(e.g. 10.0.0.1:1234 or [fd00::1]:1234){where}")
    return host, int(port)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise MultiHostSpecError(f"{key}={env[key]!r} is not an integer") from None


def initialize(spec: MultiHost) -> None:
    """Join the job `spec` describes (jax.distributed.initialize); returns once every process has joined.

    On JAX's CPU platform cross-process collectives need an implementation: gloo is chosen unless
    one is already configured. Calling it again with the same spec is a no-op.
    """
    import jax

    if is_initialized():
        if (jax.process_count(), jax.process_index()) == (spec.num_processes, spec.process_id):
            return
        raise MultiHostError(f"this process already joined a JAX job as process {jax.process_index()} of "
                             f"{jax.process_count()}; cannot join as {spec.label}")
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"coordinator_address": spec.coordinator, "num_processes": spec.num_processes,
              "process_id": spec.process_id, "cluster_detection_method": "deactivate",
              "local_device_ids": list(spec.local_device_ids) if spec.local_device_ids is not None else None,
              "initialization_timeout": spec.timeout_s, "heartbeat_timeout_seconds": spec.heartbeat_timeout_s}
    accepted = inspect.signature(jax.distributed.initialize).parameters
    try:
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})
    except Exception as e:  # JAX raises RuntimeError or its own XlaRuntimeError; both mean "not joined"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "before" in first and "initialize" in first:
            raise MultiHostError(f"cannot join the JAX job as {spec.label}: JAX already started its backends "
                                 f"in this process; initialize before jax.devices() or jax_backend.init()") from e
        raise MultiHostError(f"cannot join the JAX job as {spec.label}: {first[:300]}") from e


def is_initialized() -> bool:
    """Whether this process has joined a multi-host JAX job."""
    import jax

    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed  # jax < 0.4.34 has no public is_initialized

    return distributed.global_state.client is not None


def shutdown() -> None:
    """Leave the job (waits for the other processes to leave too); a no-op when not joined."""
    import jax

    if is_initialized():
        jax.distributed.shutdown()
