"""`chipcheck sweep`: the sbatch script's content, and a Kubernetes manifest that validates."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import run_cli

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
