"""Kubernetes: an Indexed Job (one pod per node, torchrun inside) and a headless Service for rendezvous.

Pod i of the Indexed Job is node rank i ($JOB_COMPLETION_INDEX); its hostname is `<job>-<i>` and,
with the Job's pods in the Service's subdomain, `<job>-0.<service>` resolves to pod 0, where
torchrun's static rendezvous (rank 0's store) listens. Each pod asks for its GPUs and lands on the
selected nodes; the node's name becomes the host name in results, so quarantine cordons the right
node. The manifest is validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
offline, its bundled schemas).

`--backend jax`: pod i is process i of one JAX job (`chipcheck run --backend jax --coordinator
<job>-0.<service>:PORT --num-processes NODES --process-id $JOB_COMPLETION_INDEX`), driving every
device the pod gets (`--gpus-per-node` of `--gpu-resource`, e.g. google.com/tpu); the Service
and the container declare both ports (JAX's coordinator, and chipcheck's results store at
PORT + 1, both served by pod 0), and a required pod anti-affinity keeps one pod per node.
"""

from __future__ import annotations

import json
from typing import Any

from .sweep import SweepError, SweepSpec, jax_task, shell_line

K8S_VERSION = "1.30.0"


def manifest(spec: SweepSpec) -> list[dict[str, Any]]:
    """[headless Service, Indexed Job]."""
    spec.validate()
    name, svc = spec.job_name, f"{spec.job_name}-rdzv"
    labels = {"app.kubernetes.io/name": "chipcheck", "chipcheck.io/sweep": name}
    if spec.jax:
        cmd = _jax_command(spec, f"{name}-0.{svc}")
        ports = [{"containerPort": spec.master_port, "name": "jax-coord"},
                 {"containerPort": spec.master_port + 1, "name": "results"}]
    else:
        torchrun = ["python", "-m", "torch.distributed.run", f"--nnodes={spec.nodes}",
                    f"--nproc-per-node={spec.procs_per_node}", "--node-rank=$(JOB_COMPLETION_INDEX)",
                    f"--master-addr={name}-0.{svc}", f"--master-port={spec.master_port}", "-m", "chipcheck.worker",
                    *spec.worker_args]
        # The node rank comes from the environment: bash expands it, every other word is quoted.
        cmd = "exec " + shell_line(torchrun).replace("'--node-rank=$(JOB_COMPLETION_INDEX)'",
                                                     '--node-rank="$JOB_COMPLETION_INDEX"')
        ports = [{"containerPort": spec.master_port, "name": "rdzv"}]
    resources: dict[str, Any] = {}
    if spec.gpus_per_proc:
        n = str(spec.gpus_per_proc * spec.procs_per_node)
        resources = {"limits": {spec.gpu_resource: n}, "requests": {spec.gpu_resource: n}}
    container: dict[str, Any] = {
        "name": "chipcheck", "image": spec.image, "command": ["bash", "-c", cmd],
        "workingDir": spec.host_path,
        "env": [{"name": "CHIPCHECK_HOSTNAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "ports": ports,
        "volumeMounts": [{"name": "results", "mountPath": spec.host_path}],
        **({"resources": resources} if resources else {}),
    }
    pod: dict[str, Any] = {
        "subdomain": svc, "restartPolicy": "Never", "containers": [container],
        "volumes": [{"name": "results", "hostPath": {"path": spec.host_path, "type": "DirectoryOrCreate"}}],
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.jax:  # one JAX process per host: never two pods of the sweep on one node
        pod["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": dict(labels)}, "topologyKey": "kubernetes.io/hostname"}]}}
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": svc, "namespace": spec.namespace, "labels": dict(labels)},
               "spec": {"clusterIP": "None", "selector": dict(labels), "publishNotReadyAddresses": True,
                        "ports": [{"name": p["name"], "port": p["containerPort"]} for p in ports]}}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": name, "namespace": spec.namespace, "labels": dict(labels)},
           "spec": {"completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
                    "backoffLimit": 0, "ttlSecondsAfterFinished": 7 * 86400,
                    "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}
    return [service, job]


def _jax_command(spec: SweepSpec, coordinator_host: str) -> str:
    """The pod's bash script: process id = the pod's completion index, its own outputs, then the run."""
    run = ["python", "-m", "chipcheck.cli", *spec.worker_args, "--coordinator",
           f"{coordinator_host}:{spec.master_port}", "--num-processes", str(spec.nodes)]
    return "\n".join([*jax_task(spec, "JOB_COMPLETION_INDEX", "CHIPCHECK_HOSTNAME"),
                      f'exec {shell_line(run)} --process-id "$i" "$@"'])


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML (PyYAML when installed; else JSON, which is YAML too)."""
    try:
        import yaml
    except ImportError:
        return "\n---\n".join(json.dumps(d, indent=2) for d in docs) + "\n"

    class Dumper(yaml.SafeDumper):
        """Multi-line strings (a pod's script) as literal blocks, line for line."""

    def text(dumper: yaml.SafeDumper, data: str) -> Any:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)

    Dumper.add_representer(str, text)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False)


def validate(docs: list[dict[str, Any]], version: str = K8S_VERSION) -> list[str]:
    """Schema errors of every document ([] when valid), strict: unknown fields are errors too."""
    try:
        import kubernetes_validate
    except ImportError:
        raise SweepError("validating the manifest needs kubernetes-validate (pip install kubernetes-validate)") \
            from None
    errors = []
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d.get('kind')} {d.get('metadata', {}).get('name')}: {e.message} at "
                          f"{'.'.join(str(p) for p in e.path)}")
    return errors
