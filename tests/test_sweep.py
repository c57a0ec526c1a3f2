"""`chipcheck sweep`: the sbatch script's content, and a Kubernetes manifest that validates."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port, run_cli

from chipcheck.fleet import k8s, slurm, sweep


def _spec(**kw: object) -> sweep.SweepSpec:
    args = ("run", "--devices", "auto", "--profile", "standard", "--db", "/shared/r.db", "-q")
    return sweep.SweepSpec(**{"nodes": 4, "procs_per_node": 8, "worker_args": args, "workdir": "/shared",
                              "db_path": "/shared/r.db", "local_dir": "/shared/shards", **kw})  # type: ignore[arg-type]


def test_sbatch_script_starts_one_task_per_gpu_with_torchrun_env() -> None:
    text = slurm.script(_spec(partition="gpu", time_limit="00:30:00"))
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=00:30:00"):
        assert line + "\n" in text
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in text
    assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in text
    assert "-m chipcheck.worker run --devices auto --profile standard --db /shared/r.db -q" in text
    assert "-m chipcheck.cli ingest --db /shared/r.db /shared/shards" in text
    assert "--gpus-per-task" not in slurm.script(_spec(gpus_per_proc=0))


def test_job_id_is_parsed() -> None:
    assert slurm.parse_job_id("1234\n") == "1234"
    assert slurm.parse_job_id("77;cluster-a") == "77"


def test_manifest_is_an_indexed_job_with_a_headless_service_and_validates() -> None:
    docs = k8s.manifest(_spec(node_selector=(("nvidia.com/gpu.product", "H100"),)))
    assert k8s.validate(docs) == []
    svc, job = docs
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    c = pod["containers"][0]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert '--node-rank="$JOB_COMPLETION_INDEX"' in c["command"][2]
    assert "--master-addr=chipcheck-0.chipcheck-rdzv" in c["command"][2]
    assert list(yaml.safe_load_all(k8s.to_yaml(docs))) == docs
    bad = [svc, {**job, "spec": {**job["spec"], "completions": "four"}}]
    assert k8s.validate(bad) and "completions" in k8s.validate(bad)[0]


def test_cli_writes_them_and_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "job.yaml"
    p = run_cli("sweep", "--launcher", "k8s", "--nodes", "2", "--node-selector", "pool=gpu", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert [d["kind"] for d in yaml.safe_load_all(out.read_text())] == ["Service", "Job"]
    p = run_cli("sweep", "--launcher", "slurm", "--devices", "cpu", "--ntasks-per-node", "2", "-o",
                str(tmp_path / "j.sbatch"))
    assert p.returncode == 0 and "--gpus-per-task" not in (tmp_path / "j.sbatch").read_text()
    for bad, msg in ((["--probes", "nope"], "unknown probe"), (["--nodes", "0"], "at least 1"),
                     (["--node-selector", "x"], "KEY=VALUE")):
        p = run_cli("sweep", "--launcher", "slurm", "-o", str(tmp_path / "x.sbatch"), *bad)
        assert p.returncode == 2 and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr


# ---- --backend jax: one `chipcheck run --backend jax` process per host, joined into one JAX job ----------------


def _jax_spec(**kw: object) -> sweep.SweepSpec:
    every, first = sweep.jax_args({"profile": "quick", "seed": 0, "min_gap": 0.9, "inject": (), "reports": (),
                                   "db_path": "/shared/r.db", "json_path": "/shared/r.json"}, "matmul")
    return _spec(**{"backend": "jax", "procs_per_node": 1, "gpus_per_proc": 4, "worker_args": every,
                    "first_args": first, **kw})


def _task_argv(task: str, env: dict[str, str]) -> list[str]:
    """What a task wrapper execs, with "$0" = printf: one argument a line."""
    p = subprocess.run(["bash", "-c", task, "printf", "%s\\n", "CMD"], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], **env}, timeout=10)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_jax_sbatch_script_starts_one_process_per_node_with_explicit_flags(tmp_path: Path) -> None:
    text = slurm.script(_jax_spec(partition="tpu"))
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=tpu"):
        assert line + "\n" in text
    assert "--gpus-per-task" not in text and "chipcheck.worker" not in text and " ingest" not in text
    assert 'COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in text
    assert "$(( 29500 + 2 * (SLURM_JOB_ID % 500) ))" in text  # a port pair per job: coordinator, results store
    assert "srun --kill-on-bad-exit=0 --ntasks-per-node=1 bash -c '" in text
    assert ("-m chipcheck.cli run --backend jax --probes matmul --profile quick --seed 0 --min-gap 0.9 -q \\\n"
            '    --coordinator "$COORDINATOR:$PORT" --num-processes "$SLURM_JOB_NUM_NODES"\nrc=$?') in text
    assert "-m chipcheck.cli history --db /shared/r.db || true\nexit $rc\n" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "#SBATCH --gpus-per-node" not in slurm.script(_jax_spec(gpus_per_proc=0))
    # the task wrapper, as srun runs it: process 0 writes the sweep's files, process 3 its own
    task = shlex.split(text.split("bash -c ", 1)[1].split(" \\\n", 1)[0])[0]
    assert _task_argv(task, {"SLURM_PROCID": "0", "SLURMD_NODENAME": "n0"}) == \
        ["CMD", "--db", "/shared/r.db", "--json", "/shared/r.json", "--process-id", "0"]
    own = _task_argv(task.replace("/shared/shards", str(tmp_path / "shards")),
                     {"SLURM_PROCID": "3", "SLURMD_NODENAME": "n3"})
    assert own == ["CMD", "--db", f"{tmp_path}/shards/jax-n3-3.db", "--json", f"{tmp_path}/shards/jax-n3-3.json",
                   "--process-id", "3"] and (tmp_path / "shards").is_dir()


def test_jax_manifest_one_pod_per_node_joins_pod_0_and_validates() -> None:
    docs = k8s.manifest(_jax_spec(gpu_resource="google.com/tpu",
                                  node_selector=(("cloud.google.com/gke-tpu-topology", "2x2x4"),)))
    assert k8s.validate(docs) == []
    svc, job = docs
    assert svc["spec"]["ports"] == [{"name": "jax-coord", "port": 29500}, {"name": "results", "port": 29501}]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert [p["containerPort"] for p in c["ports"]] == [29500, 29501]
    assert c["resources"]["limits"] == {"google.com/tpu": "4"}
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"] == job["spec"]["template"]["metadata"]["labels"]
    script = c["command"][2]
    assert "i=$JOB_COMPLETION_INDEX" in script
    assert script.endswith("-m chipcheck.cli run --backend jax --probes matmul --profile quick --seed 0 "
                           "--min-gap 0.9 -q --coordinator chipcheck-0.chipcheck-rdzv:29500 --num-processes 4 "
                           '--process-id "$i" "$@"')
    assert list(yaml.safe_load_all(k8s.to_yaml(docs))) == docs
    assert "\n        - |" in k8s.to_yaml(docs)  # the pod's script stays readable, line for line


def test_jax_pods_of_the_manifest_join_one_job(tmp_path: Path) -> None:
    """The pod script itself, two "pods" on this machine (Service DNS name -> 127.0.0.1, 2 host devices each)."""
    pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")
    port = free_port()
    # collectives only: every case is one program over both processes (and none can leave the job early:
    # with matmul last, process 0's host process may exit first and JAX then aborts process 1's)
    out = run_cli("sweep", "--launcher", "k8s", "--backend", "jax", "--nodes", "2", "--gpus-per-node", "0",
                  "--probes", "collectives", "--min-gap", "0.9", "--master-port", str(port), "--db", "r.db", "--json",
                  "r.json", "-o", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    job = list(yaml.safe_load_all((tmp_path / "job.yaml").read_text()))[1]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in c
    script = c["command"][2].replace("chipcheck-0.chipcheck-rdzv:", "127.0.0.1:")
    (tmp_path / "bin").mkdir()
    # a wrapper, not a symlink: a linked venv interpreter looks for pyvenv.cfg beside the link and
    # leaves the venv (chipcheck then cannot be imported)
    py = tmp_path / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    py.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    pods = [subprocess.Popen(["bash", "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**env, "JOB_COMPLETION_INDEX": str(i), "CHIPCHECK_HOSTNAME": f"node{i}"})
            for i in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], "\n".join(x[-2000:] for x in logs)
    for js in (tmp_path / "r.json", tmp_path / "chipcheck-shards" / "jax-node1-1.json"):
        data = json.loads(js.read_text())
        assert data["verdict"] == "pass"
        assert [(d["rank"], d["host"]) for d in data["devices"]] == [(0, "node0"), (1, "node0"), (2, "node1"),
                                                                     (3, "node1")]
    assert (tmp_path / "r.db").exists() and (tmp_path / "chipcheck-shards" / "jax-node1-1.db").exists()


def test_cli_jax_sweep_rejects_what_jax_cannot_do(tmp_path: Path) -> None:
    base = ["sweep", "--backend", "jax", "-o", str(tmp_path / "x")]
    for launcher, bad, msg in (
            ("slurm", ["--ntasks-per-node", "8"], "one process per node"),
            ("k8s", ["--ntasks-per-node", "2"], "one process per node"),
            ("slurm", ["--gpus-per-task", "1"], "use --gpus-per-node"),
            ("slurm", ["--devices", "cpu:2"], "drop --devices cpu:2"),
            ("local", ["--devices", "cpu:2"], "drop --devices cpu:2"),
            ("k8s", ["--probes", "memory"], "not on the JAX path"),
            ("slurm", ["--master-port", "65000"], "use 64536 or lower"),
            ("k8s", ["--master-port", "65535"], "also needs port 65536"),
            ("k8s", ["--gpus-per-node", "-1"], "--gpus-per-node must be >= 0")):
        p = run_cli(*base, "--launcher", launcher, *bad)
        assert p.returncode == 2 and msg in p.stderr and p.stderr.count("\n") == 1, (bad, p.stderr)
    p = run_cli("sweep", "--launcher", "slurm", "--gpus-per-node", "4", "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and "--gpus-per-node is for --backend jax" in p.stderr, p.stderr
    p = run_cli(*base, "--launcher", "slurm", "--ntasks-per-node", "1")  # saying the obvious is fine
    assert p.returncode == 0 and "#SBATCH --ntasks-per-node=1\n" in (tmp_path / "x").read_text(), p.stderr


def test_local_jax_sweep_is_chipcheck_run_backend_jax(tmp_path: Path) -> None:
    pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")
    p = run_cli("sweep", "--launcher", "local", "--backend", "jax", "--probes", "matmul", "--min-gap", "0.9",
                "--db", str(tmp_path / "r.db"), "--json", str(tmp_path / "r.json"), "-q",
                env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("New since the last sweep")
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["devices"]) == 2 and all(d["verdict"] == "pass" for d in data["devices"])
    # a busy host can make the judge retest a device (and clear it); nothing else runs
    assert all({pr["probe"] for pr in d["probes"]} in ({"matmul"}, {"matmul", "retest"}) for d in data["devices"])
