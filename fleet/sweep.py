"""`chipcheck sweep --launcher local|slurm|k8s`: the same worker, started by the engine the fleet already uses.

chipcheck has no cluster runtime of its own: a sweep is the distributed worker
(`python -m chipcheck.worker run ...`, fleet.distributed) started one process per device by
srun (an sbatch script, fleet.slurm), by torchrun in a Kubernetes Indexed Job (fleet.k8s), or by
the local launcher on this machine. This module holds what every launcher shares: the sweep's
shape and the worker's command line.

`--backend jax` follows JAX's model instead: one process per host, driving every device of the
host (`chipcheck run --backend jax --coordinator FIRST:PORT --num-processes NODES --process-id I`,
docs/jax.md), process 0 on the first node. Every process ends with the whole job's results;
process 0 writes the sweep's --db, --json and --report files, process I > 0 its own --db (and
--json) under --local-dir (`jax_task`), so no two processes share a file.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field


class SweepError(ValueError):
    """Bad sweep input (one line, exit 2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepSpec:
    """The shape of one sweep and where its results go."""

    nodes: int = 1
    """Hosts in the sweep."""
    procs_per_node: int = 8
    """Worker processes per host: one per GPU (or per virtual CPU device with --devices cpu)."""
    gpus_per_proc: int = 1
    """GPUs each worker asks the scheduler for (0 on CPU nodes)."""
    worker_args: tuple[str, ...] = ()
    """`run ...` or `links ...`: the options of `chipcheck run` / `links` for every worker."""
    job_name: str = "chipcheck"
    python: str = field(default_factory=lambda: sys.executable)
    """The Python with chipcheck installed on the nodes."""
    workdir: str = "."
    """Working directory of the job (relative --db/--json/--local-dir resolve here)."""
    db_path: str | None = None
    local_dir: str = "chipcheck-shards"
    master_port: int = 29500
    # Slurm
    partition: str | None = None
    time_limit: str | None = None
    # Kubernetes
    image: str = "chipcheck:latest"
    namespace: str = "default"
    node_selector: tuple[tuple[str, str], ...] = ()
    gpu_resource: str = "nvidia.com/gpu"
    host_path: str = "/var/lib/chipcheck"
    """Node folder mounted at the same path in every pod: local shards, and rank 0's store."""
    backend: str = "torch"
    """torch: one worker per device (`python -m chipcheck.worker`); jax: one `chipcheck run --backend
    jax` process per host (procs_per_node 1, gpus_per_proc = the host's GPUs/TPUs)."""
    first_args: tuple[str, ...] = ()
    """jax: options only process 0 gets (the sweep's --db, --json, --report: the job's record)."""

    def validate(self) -> None:
        if self.nodes < 1 or self.procs_per_node < 1:
            raise SweepError("--nodes and --ntasks-per-node must be at least 1")
        if self.gpus_per_proc < 0:
            raise SweepError(f"{'--gpus-per-node' if self.jax else '--gpus-per-task'} must be >= 0")
        if not 1 <= self.master_port <= 65535:
            raise SweepError(f"--master-port {self.master_port} is not a TCP port")
        if not self.worker_args or self.worker_args[0] not in ("run", "links"):
            raise SweepError("a sweep runs `run` or `links` on every worker")
        if self.jax:
            if self.procs_per_node != 1:
                raise SweepError(f"--backend jax runs one process per node, driving all its devices; drop "
                                 f"--ntasks-per-node {self.procs_per_node}")
            if self.master_port >= 65535:
                raise SweepError(f"--master-port {self.master_port}: --backend jax also needs port "
                                 f"{self.master_port + 1} (process 0's results store)")

    @property
    def jax(self) -> bool:
        return self.backend == "jax"

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def worker_args(command: str, kw: dict[str, object], probes: str, local_dir: str) -> tuple[str, ...]:
    """The worker's options, rebuilt from the parsed `chipcheck sweep` options (only those given)."""
    args: list[str] = [command]
    if probes:
        args += ["--probes", probes]
    for flag, key in (("--devices", "devices"), ("--profile", "profile"), ("--duration", "duration"),
                      ("--seed", "seed"), ("--db", "db_path"), ("--json", "json_path"), ("--timeout", "timeout"),
                      ("--min-gap", "min_gap")):
        value = kw.get(key)
        if value is not None:
            args += [flag, str(value)]
    for spec in kw.get("inject") or ():  # type: ignore[union-attr]
        args += ["--inject", str(spec)]
    for spec in kw.get("reports") or ():  # type: ignore[union-attr]
        args += ["--report", str(spec)]
    args += ["--local-dir", local_dir, "-q"]
    return tuple(args)


def jax_args(kw: dict[str, object], probes: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every process's `chipcheck run --backend jax` options, process 0's own: --db, --json, --report).

    The coordinator, --num-processes and --process-id are the launcher's (`jax_task`); --devices
    is not passed (JAX drives every device of the host).
    """
    args: list[str] = ["run", "--backend", "jax"]
    if probes:
        args += ["--probes", probes]
    for flag, key in (("--profile", "profile"), ("--duration", "duration"), ("--seed", "seed"),
                      ("--timeout", "timeout"), ("--min-gap", "min_gap")):
        value = kw.get(key)
        if value is not None:
            args += [flag, str(value)]
    for spec in kw.get("inject") or ():  # type: ignore[union-attr]
        args += ["--inject", str(spec)]
    first: list[str] = []
    for flag, key in (("--db", "db_path"), ("--json", "json_path")):
        if kw.get(key):
            first += [flag, str(kw[key])]
    for spec in kw.get("reports") or ():  # type: ignore[union-attr]
        first += ["--report", str(spec)]
    return (*args, "-q"), tuple(first)


def jax_task(spec: SweepSpec, index: str, node: str) -> list[str]:
    """Shell lines that set this process's id `i` and append its own outputs to "$@".

    `index` / `node`: the variables holding the process id and the node's name ($SLURM_PROCID /
    $SLURMD_NODENAME under srun, $JOB_COMPLETION_INDEX / $CHIPCHECK_HOSTNAME in a pod). Process 0
    gets the sweep's --db/--json/--report; process I > 0 writes `LOCAL_DIR/jax-NODE-I.db` (and
    `.json` when the sweep asked for one), so processes sharing a file system never share a file.
    """
    d = shlex.quote(spec.local_dir)
    own = f'--db "$d/jax-${node}-$i.db"'
    if "--json" in spec.first_args:
        own += f' --json "$d/jax-${node}-$i.json"'
    first = f'set -- "$@" {shlex.join(spec.first_args)}' if spec.first_args else ":"
    return [f"i=${index} d={d}",
            f'if [ "$i" = 0 ]; then {first}',
            f'else mkdir -p "$d" || exit 2; set -- "$@" {own}; fi']


def shell_line(argv: list[str] | tuple[str, ...]) -> str:
    return shlex.join(list(argv))
