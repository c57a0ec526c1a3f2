"""`chipcheck sweep`: one run across hosts through a launcher (local, Slurm, Kubernetes)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from ..options import (
    check_writable,
    common_options,
    fail,
    run_options,
)
from .common import print_news, write_output
from .run import execute


@click.command()
@click.option("--launcher", type=click.Choice(["local", "slurm", "k8s"]), required=True,
              help="local: run here; slurm: write (and --submit) an sbatch script; k8s: write an Indexed Job manifest.")
@click.option("--probes", default="", help="Comma-separated probes to run [default: every probe the devices allow].")
@click.option("--backend", type=click.Choice(["torch", "jax"]), default="torch", show_default=True,
              help="torch: one worker per GPU; jax: one `chipcheck run --backend jax` process per host driving all "
                   "its devices (GPUs, TPUs), the hosts joined into one JAX job (docs/jax.md). With --launcher "
                   "local it is `chipcheck run --backend jax` on this host.")
@click.option("--nodes", default=1, show_default=True, type=int, help="Hosts in the sweep (slurm, k8s).")
@click.option("--ntasks-per-node", "per_node", default=8, show_default=True, type=int,
              help="Workers per host: one per GPU, or per virtual CPU device with --devices cpu (slurm, k8s; "
                   "always 1 with --backend jax).")
@click.option("--gpus-per-task", default=1, show_default=True, type=int,
              help="GPUs per worker (0, and ignored, with --devices cpu).")
@click.option("--gpus-per-node", default=None, type=int,
              help="--backend jax: GPUs/TPUs per host, all to its one process (slurm: --gpus-per-node; k8s: that "
                   "many --gpu-resource, e.g. google.com/tpu; 0: ask for none) [default: 8].")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time", "time_limit", default=None, help="Slurm time limit, e.g. 00:30:00.")
@click.option("--job-name", default="chipcheck", show_default=True)
@click.option("--image", default="chipcheck:latest", show_default=True, help="Container image (k8s).")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--node-selector", multiple=True, metavar="KEY=VALUE", help="k8s node selector (repeatable).")
@click.option("--gpu-resource", default="nvidia.com/gpu", show_default=True, help="k8s GPU resource name.")
@click.option("--master-port", default=29500, show_default=True, type=int, help="Rendezvous port on the first node.")
@click.option("--local-dir", default="chipcheck-shards", show_default=True,
              help="Where each rank keeps its JSONL shard (shared storage collects every node's).")
@click.option("-o", "--output", default=None, help="Script/manifest file [default: JOB-NAME.sbatch / JOB-NAME.yaml].")
@click.option("--submit", is_flag=True, help="slurm: sbatch the script; prints the job id.")
@click.option("--wait", is_flag=True, help="With --submit: wait for the job and exit with its code.")
@common_options
def sweep(launcher: str, probes: str, backend: str, nodes: int, per_node: int, gpus_per_task: int,
          gpus_per_node: int | None, partition: str | None, time_limit: str | None, job_name: str, image: str,
          namespace: str, node_selector: tuple[str, ...], gpu_resource: str, master_port: int, local_dir: str,
          output: str | None, submit: bool, wait: bool, **kw: Any) -> None:
    """A fleet sweep on the engine the fleet already uses: this machine, Slurm (srun) or Kubernetes."""

    from click.core import ParameterSource

    from ..fleet import k8s, slurm
    from ..fleet import sweep as sweepmod
    from ..fleet.runner import UsageError

    names = tuple(p.strip() for p in probes.split(",") if p.strip())
    source = click.get_current_context().get_parameter_source
    try:
        if backend == "jax":
            if source("per_node") is not ParameterSource.DEFAULT and per_node != 1:
                raise sweepmod.SweepError(f"--backend jax runs one process per node, driving all its devices; drop "
                                          f"--ntasks-per-node {per_node}")
            if source("gpus_per_task") is not ParameterSource.DEFAULT:
                raise sweepmod.SweepError("--backend jax gives all of a node's devices to its one process: use "
                                          "--gpus-per-node, not --gpus-per-task")
        elif gpus_per_node is not None:
            raise sweepmod.SweepError("--gpus-per-node is for --backend jax; torch workers ask for --gpus-per-task")
    except sweepmod.SweepError as e:
        fail(str(e))
    executor = None
    if backend == "jax":
        import functools

        from ..fleet import jax_multihost, jax_runner

        try:
            multihost = jax_multihost.MultiHost.resolve() if launcher == "local" else None
            jax_runner.validate_jax(run_options(kw, names, {}))  # what the JAX path cannot do, before writing anything
        except (jax_multihost.MultiHostSpecError, UsageError) as e:
            fail(str(e))
        executor = functools.partial(jax_runner.execute, multihost=multihost)
    if launcher == "local":  # --backend jax: exactly `chipcheck run --backend jax`, with the news first
        execute(lambda: run_options(kw, names, {}), kw, preface=lambda path: print_news(path), executor=executor)
    try:
        sel = tuple(tuple(x.split("=", 1)) for x in node_selector)
        if any(len(x) != 2 or not x[0] for x in sel):
            raise sweepmod.SweepError("--node-selector expects KEY=VALUE, e.g. nvidia.com/gpu.product=H100")
        cpu = kw["devices"].startswith("cpu")
        if backend == "jax":
            every, first = sweepmod.jax_args(kw, probes)
            shape: dict[str, Any] = {"procs_per_node": 1, "worker_args": every, "first_args": first,
                                     "gpus_per_proc": 8 if gpus_per_node is None else gpus_per_node}
        else:
            shape = {"procs_per_node": per_node, "gpus_per_proc": 0 if cpu else gpus_per_task,
                     "worker_args": sweepmod.worker_args("run", kw, probes, local_dir)}
        spec = sweepmod.SweepSpec(
            nodes=nodes, backend=backend, job_name=job_name, **shape,
            workdir=os.getcwd(), db_path=kw["db_path"], local_dir=local_dir, master_port=master_port,
            partition=partition, time_limit=time_limit, image=image, namespace=namespace,
            node_selector=sel, gpu_resource=gpu_resource)  # type: ignore[arg-type]
        from ..fleet import runner

        runner.validate(run_options(kw, names, {}))  # the worker options are checked here, not on 1,000 nodes
        if launcher == "slurm":
            text = slurm.script(spec)
            path = Path(output or f"{job_name}.sbatch")
        else:
            docs = k8s.manifest(spec)
            errors = k8s.validate(docs)
            if errors:
                raise sweepmod.SweepError("the manifest does not validate: " + "; ".join(errors))
            text, path = k8s.to_yaml(docs), Path(output or f"{job_name}.yaml")
        check_writable(path, "-o")
        write_output(path, text, "-o")
        click.echo(f"wrote {path}", err=True)
        if submit and launcher == "k8s":
            raise sweepmod.SweepError(f"--submit is for slurm; apply the manifest with `kubectl apply -f {path}`")
        if submit:
            job, code = slurm.submit(str(path), wait=wait)
            click.echo(job)
            sys.exit(code if wait else 0)
    except (sweepmod.SweepError, UsageError, click.BadParameter) as e:
        fail(str(e.format_message() if isinstance(e, click.BadParameter) else e))


