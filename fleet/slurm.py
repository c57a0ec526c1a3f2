"""Slurm: an sbatch script that starts one worker per device with srun, then collects the results.

srun starts `--ntasks-per-node` tasks on each node; each task gets torchrun's environment from
Slurm's own (RANK=$SLURM_PROCID, WORLD_SIZE=$SLURM_NTASKS, LOCAL_RANK=$SLURM_LOCALID,
LOCAL_WORLD_SIZE from $SLURM_NTASKS_PER_NODE) through a small `bash -c` wrapper, so each task
computes its own. MASTER_ADDR is the job's first node, where rank 0 hosts the rendezvous store.
After the step, `chipcheck ingest` merges the shards in --local-dir (all nodes' when it is on
shared storage), which is idempotent with what rank 0 already stored, and rescues the results
when rank 0 died.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from .sweep import SweepError, SweepSpec

_JOB_ID = re.compile(r"^\s*(\d+)(?:;\S+)?\s*$")

# The wrapper each srun task runs: torchrun's variables from Slurm's, then the worker itself ("$0" "$@").
_TASK_ENV = ('export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; '
             'lw=${SLURM_NTASKS_PER_NODE:-1}; export LOCAL_WORLD_SIZE=${lw%%(*}; exec "$0" "$@"')


def script(spec: SweepSpec) -> str:
    """The sbatch script text."""
    spec.validate()
    py = shlex.quote(spec.python)
    lines = ["#!/bin/bash", "# chipcheck sweep: written by `chipcheck sweep --launcher slurm`",
             f"#SBATCH --job-name={spec.job_name}", f"#SBATCH --nodes={spec.nodes}",
             f"#SBATCH --ntasks-per-node={spec.procs_per_node}"]
    if spec.gpus_per_proc:
        lines.append(f"#SBATCH --gpus-per-task={spec.gpus_per_proc}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.time_limit:
        lines.append(f"#SBATCH --time={spec.time_limit}")
    lines += [f"#SBATCH --chdir={spec.workdir}", f"#SBATCH --output={spec.workdir}/{spec.job_name}-%j.out", "",
              "set -uo pipefail",
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
