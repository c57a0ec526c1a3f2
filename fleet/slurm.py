"""Slurm: an sbatch script that starts one worker per device with srun, then collects the results.

srun starts `--ntasks-per-node` tasks on each node; each task gets torchrun's environment from
Slurm's own (RANK=$SLURM_PROCID, WORLD_SIZE=$SLURM_NTASKS, LOCAL_RANK=$SLURM_LOCALID,
LOCAL_WORLD_SIZE from $SLURM_NTASKS_PER_NODE) through a small `bash -c` wrapper, so each task
computes its own. MASTER_ADDR is the job's first node, where rank 0 hosts the rendezvous store.
After the step, `chipcheck ingest` merges the shards in --local-dir (all nodes' when it is on
shared storage), which is idempotent with what rank 0 already stored, and rescues the results
when rank 0 died.

`--backend jax` (`_jax_script`): one task per node (`--ntasks-per-node=1`, `--exclusive`, the
node's GPUs with `--gpus-per-node`), each `chipcheck run --backend jax` with explicit multi-host
flags: the coordinator is the job's first node at a per-job port (the results store of process
0 at port + 1), `--num-processes $SLURM_JOB_NUM_NODES`, `--process-id $SLURM_PROCID`. No
ingest: every process ends with the whole job's results, process 0's in the sweep's --db. The
job's exit code is srun's (the highest task's; every process judges the same job alike).
"""

from __future__ import annotations

import re
import shlex
import subprocess

from .sweep import SweepError, SweepSpec, jax_task

_JOB_ID = re.compile(r"^\s*(\d+)(?:;\S+)?\s*$")

# The wrapper each srun task runs: torchrun's variables from Slurm's, then the worker itself ("$0" "$@").
_TASK_ENV = ('export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; '
             'lw=${SLURM_NTASKS_PER_NODE:-1}; export LOCAL_WORLD_SIZE=${lw%%(*}; exec "$0" "$@"')


def script(spec: SweepSpec) -> str:
    """The sbatch script text."""
    spec.validate()
    if spec.jax:
        return _jax_script(spec)
    py = shlex.quote(spec.python)
    lines = _header(spec, "", f"--gpus-per-task={spec.gpus_per_proc}" if spec.gpus_per_proc else "")
    lines += ["set -uo pipefail",
              'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
              "# one port per job, so two sweeps sharing a first node do not collide",
              f'export MASTER_PORT="${{MASTER_PORT:-$(( {spec.master_port} + SLURM_JOB_ID % 1000 ))}}"', "",
              f"srun --kill-on-bad-exit=0 --ntasks-per-node={spec.procs_per_node} bash -c {shlex.quote(_TASK_ENV)} \\",
              f"    {py} -m chipcheck.worker {shlex.join(spec.worker_args)}",
              "rc=$?", "",
              "# every shard in --local-dir -> the store (idempotent; rescues the results if rank 0 died)",
              f"{py} -m chipcheck.cli ingest{_db(spec)} {shlex.quote(spec.local_dir)} || true",
              "# new since the last sweep, trends",
              f"{py} -m chipcheck.cli history{_db(spec)} || true",
              "exit $rc", ""]
    return "\n".join(lines)


def _header(spec: SweepSpec, backend: str, *extra: str) -> list[str]:
    lines = ["#!/bin/bash", f"# chipcheck sweep: written by `chipcheck sweep --launcher slurm{backend}`",
             f"#SBATCH --job-name={spec.job_name}", f"#SBATCH --nodes={spec.nodes}",
             f"#SBATCH --ntasks-per-node={spec.procs_per_node}", *(f"#SBATCH {x}" for x in extra if x)]
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.time_limit:
        lines.append(f"#SBATCH --time={spec.time_limit}")
    return [*lines, f"#SBATCH --chdir={spec.workdir}", f"#SBATCH --output={spec.workdir}/{spec.job_name}-%j.out", ""]


def _jax_script(spec: SweepSpec) -> str:
    """One `chipcheck run --backend jax` process per node, joined into one JAX job by explicit flags."""
    if spec.master_port + 999 > 65535:
        raise SweepError(f"--master-port {spec.master_port}: the job's ports go up to {spec.master_port + 999} "
                         f"(port + 2 * (job id % 500), + 1 for the results store); use 64536 or lower")
    py = shlex.quote(spec.python)
    task = "\n" + jax_task_wrapper(spec)
    lines = _header(spec, " --backend jax", "--exclusive",
                    f"--gpus-per-node={spec.gpus_per_proc}" if spec.gpus_per_proc else "")
    lines += ["set -uo pipefail",
              "# process 0 runs on the first node: JAX's coordinator at PORT, chipcheck's results store at PORT+1",
              'COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
              "# one port pair per job, so two sweeps sharing a first node do not collide",
              f'PORT="${{CHIPCHECK_SWEEP_PORT:-$(( {spec.master_port} + 2 * (SLURM_JOB_ID % 500) ))}}"', "",
              "# one task per node, all of the node's devices; process 0 writes the sweep's --db/--json,",
              "# process i > 0 its own copy of the whole job's results under --local-dir",
              f"srun --kill-on-bad-exit=0 --ntasks-per-node=1 bash -c {shlex.quote(task)} \\",
              f'    {py} -m chipcheck.cli {shlex.join(spec.worker_args)} \\',
              '    --coordinator "$COORDINATOR:$PORT" --num-processes "$SLURM_JOB_NUM_NODES"',
              "rc=$?  # srun's: the highest task's (0 pass, 1 a device failed, 2 setup error)", "",
              "# new since the last sweep, trends",
              f"{py} -m chipcheck.cli history{_db(spec)} || true",
              "exit $rc", ""]
    return "\n".join(lines)


def jax_task_wrapper(spec: SweepSpec, node: str = "SLURMD_NODENAME") -> str:
    """What each srun task of a JAX sweep runs (`bash -c WRAPPER CMD ARGS...`): process id = the task's
    Slurm rank, its own outputs (`sweep.jax_task`), then the command itself ("$0" "$@")."""
    return "\n".join([*jax_task(spec, "SLURM_PROCID", node), 'exec "$0" "$@" --process-id "$i"'])


def _db(spec: SweepSpec) -> str:
    return f" --db {shlex.quote(spec.db_path)}" if spec.db_path else ""


def parse_job_id(text: str) -> str:
    """`sbatch --parsable` prints `JOBID` or `JOBID;CLUSTER`."""
    m = _JOB_ID.match(text.strip().splitlines()[-1] if text.strip() else "")
    if not m:
        raise SweepError(f"sbatch printed no job id: {text.strip()[:200]!r}")
    return m.group(1)


def submit(path: str, *, wait: bool = False, timeout_s: float | None = None) -> tuple[str, int]:
    """sbatch the script; returns (job id, sbatch's exit code: the job's with `wait`)."""
    argv = ["sbatch", "--parsable", *(["--wait"] if wait else []), path]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise SweepError("sbatch is not on PATH: submit from a Slurm login node, or drop --submit") from None
    except subprocess.TimeoutExpired:
        raise SweepError(f"sbatch {path} did not finish within {timeout_s:g}s") from None
    if p.returncode != 0 and not p.stdout.strip():
        raise SweepError(f"sbatch {path} failed: {p.stderr.strip()[:300]}")
    return parse_job_id(p.stdout), p.returncode
