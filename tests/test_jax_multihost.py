"""Multi-host JAX (docs/jax.md): real processes joined by jax.distributed, one per "host".

Two processes on this machine, each driving 2 forced host CPU devices, form one job of 4 devices
(gloo carries the cross-process collectives). Both run every collectives case over the global
mesh (tests/jax_multihost_worker.py), clean and with faults on ranks of either process, and each
reports its own ranks: the blame must come out the same as on one host.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jax", reason="jax is not installed (pip install 'chipcheck[jax]')")

from conftest import free_port

from chipcheck.fleet import jax_multihost as mh  # noqa: E402
from chipcheck.fleet.jax_multihost import MultiHost, MultiHostSpecError  # noqa: E402

WORKER = Path(__file__).with_name("jax_multihost_worker.py")
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}



@pytest.fixture(scope="module")
def job() -> list[dict[str, Any]]:
    """Both processes' reports, by process id (one job for the whole module: ~15 s)."""
    coord = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in mh.ENV_VARS}
    procs = [subprocess.Popen([sys.executable, str(WORKER), coord, "2", str(pid)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, **ENV}) for pid in (0, 1)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            outs.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the 2-process job hung: " + " | ".join(p.communicate()[1][-1500:] for p in procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (rc, _, err) in enumerate(outs):
        assert rc == 0, f"process {pid} exited {rc}:\n{err[-3000:]}"
    return [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]


def test_global_discovery_is_the_same_ordered_list_in_both_processes(job: list[dict[str, Any]]) -> None:
    p0, p1 = job
    assert p0["devices"] == p1["devices"]
    assert [pi for _, pi in p0["devices"]] == [0, 0, 1, 1]  # global rank = (process, id) order
    assert (p0["local"], p1["local"]) == ([0, 1], [2, 3])
    assert p0["hosts"] == p1["hosts"] == ["host0", "host1"]  # each process's own name, exchanged
    assert p0["infos"] == p1["infos"]
    assert [i["host"] for i in p0["infos"]] == ["host0", "host0", "host1", "host1"]
    assert [i["index"] for i in p0["infos"]] == [0, 1, 0, 1]  # the position on its host
    assert len({i["uuid"] for i in p0["infos"]}) == 4
    assert len({i["fingerprint"] for i in p0["infos"]}) == 1  # same chips, same software: one group


def test_clean_collectives_pass_on_every_rank(job: list[dict[str, Any]]) -> None:
    for pid, rep in enumerate(job):
        assert len(rep["clean"]) == 21  # 7 ops x 3 dtypes
        for case, by_rank in rep["clean"].items():
            assert sorted(by_rank) == [str(r) for r in rep["local"]], case
            for v in by_rank.values():
                assert v["verdict"] == "pass" and v["repeats"] == [2, 0] and v["busbw"] > 0, (pid, case, v)


def _faulty(job: list[dict[str, Any]], name: str) -> dict[int, dict[str, Any]]:
    """Every global rank's outcome of one faulty case, each from the process that drives it."""
    return {int(r): v for rep in job for r, v in rep["faulty"][name].items()}


def test_psum_fault_on_a_remote_rank_is_decoded_and_blamed_on_it_alone(job: list[dict[str, Any]]) -> None:
    psum = _faulty(job, "psum")
    assert [psum[r]["verdict"] for r in range(4)] == ["pass", "pass", "wrong", "pass"]
    assert psum[2]["repeats"] == [2, 2]  # both sizes, every check
    assert "missing the contribution of rank(s) [2]" in psum[2]["notes"][0]
    # every rank's decoding names rank 2 (an inference), so the op runs again in ring pairs, pair (1, 2)
    # across the two processes: the pairs holding rank 2 fail and the others pass
    assert "pair tests name rank 2: the op failed in pairs [(1, 2), (2, 3)]" in psum[2]["notes"][0]
    # ranks 0 and 1 (process 0) and 3 saw the same corruption and are not blamed
    for r in (0, 1, 3):
        assert len(psum[r]["observed"]) == 4  # 2 sizes x 2 checks
        assert all("pair tests name rank(s) [2]" in o for o in psum[r]["observed"])


def test_a_broadcast_root_sending_bad_bits_is_blamed_from_the_other_process_too(job: list[dict[str, Any]]) -> None:
    bcast = _faulty(job, "bcast")
    assert [bcast[r]["verdict"] for r in range(4)] == ["wrong", "pass", "pass", "pass"], bcast
    assert "expected rank 0's" in bcast[0]["notes"][0]


def test_ring_blames_the_sender_in_the_other_process(job: list[dict[str, Any]]) -> None:
    ring = _faulty(job, "ring")  # rank 1 (process 0) sends bad data; only rank 2 (process 1) sees it
    assert [ring[r]["verdict"] for r in range(4)] == ["pass", "wrong", "pass", "pass"]
    assert "named by rank(s) [2]" in ring[1]["notes"][0]
    assert "pair tests name rank 1: the op failed in pairs [(0, 1), (1, 2)]" in ring[1]["notes"][0]
    assert ring[2]["observed"] and "pair tests name rank(s) [1]" in ring[2]["observed"][0]
    assert not ring[0]["observed"] and not ring[3]["observed"]


def test_all_gather_names_the_source_rank_and_bit(job: list[dict[str, Any]]) -> None:
    gather = _faulty(job, "gather")
    assert [gather[r]["verdict"] for r in range(4)] == ["pass", "pass", "wrong", "pass"]
    assert "holds rank 2's elem" in gather[2]["notes"][0] and gather[2]["bits"][0] == {"20": 1}


def test_a_slow_rank_slows_the_collective_in_every_process(job: list[dict[str, Any]]) -> None:
    slow = _faulty(job, "slow")
    assert all(v["verdict"] == "pass" for v in slow.values())
    for rep in job:  # process 0 has no slow rank, yet its collective waits for rank 2 (100x)
        # one timed loop per case is noisy on a loaded host (CI: one clean sample at 10.5 ms, the slow case
        # 93 ms), so the bar is the median of this process's 21 clean cases: ~1.5 ms here, slow ~150 ms
        clean = statistics.median(v["time_us"] for c in rep["clean"].values() for v in c.values())
        for v in rep["faulty"]["slow"].values():
            assert v["time_us"] > 10 * clean, (rep["process"], clean, v)


def test_the_single_process_api_and_a_second_job_are_refused(job: list[dict[str, Any]]) -> None:
    for rep in job:
        assert "belong to other processes" in rep["run_case"] and "run_ranks" in rep["run_case"]
        assert "already joined a JAX job" in rep["rejoin"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"coordinator": "10.0.0.1", "num_processes": 2, "process_id": 0}, "is not host:port"),
    ({"coordinator": "10.0.0.1:http", "num_processes": 2, "process_id": 0}, "is not host:port"),
    ({"coordinator": "fd00::1:1234", "num_processes": 2, "process_id": 0}, "[fd00::1]:1234"),
    ({"coordinator": "10.0.0.1:70000", "num_processes": 2, "process_id": 0}, "is not host:port"),
    ({"coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": 2}, "out of range for 2 processes"),
    ({"coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": -1}, "out of range"),
    ({"coordinator": "10.0.0.1:1234", "num_processes": 0, "process_id": 0}, "num_processes must be >= 1"),
    ({"coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": 0, "local_device_ids": (0, 0)},
     "distinct"),
])
def test_bad_specs_fail_with_one_clear_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MultiHostSpecError) as e:
        MultiHost(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_spec_from_chipcheck_environment() -> None:
    assert MultiHost.from_env({}) is None
    spec = MultiHost.from_env({mh.ENV_COORDINATOR: "[::1]:8476", mh.ENV_NUM_PROCESSES: "4",
                               mh.ENV_PROCESS_ID: "3"})
    assert spec == MultiHost(coordinator="[::1]:8476", num_processes=4, process_id=3, source="environment")
    with pytest.raises(MultiHostSpecError, match="CHIPCHECK_JAX_PROCESS_ID not"):
        MultiHost.from_env({mh.ENV_COORDINATOR: "h:1", mh.ENV_NUM_PROCESSES: "2"})
    with pytest.raises(MultiHostSpecError, match="'two' is not an integer"):
        MultiHost.from_env({mh.ENV_COORDINATOR: "h:1", mh.ENV_NUM_PROCESSES: "two", mh.ENV_PROCESS_ID: "0"})
    with pytest.raises(MultiHostSpecError, match=r"process_id 5 .*\(environment\)"):
        MultiHost.from_env({mh.ENV_COORDINATOR: "h:1", mh.ENV_NUM_PROCESSES: "2", mh.ENV_PROCESS_ID: "5"})


def test_spec_from_a_slurm_job_as_jax_detects_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_")) or k in mh.ENV_VARS:
            monkeypatch.delenv(k)
    assert MultiHost.resolve() is None  # no cluster here: a single-host run
    slurm = {"SLURM_JOB_ID": "4097", "SLURM_STEP_NODELIST": "gpu[017-020]", "SLURM_NTASKS": "4",
             "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    spec = MultiHost.resolve()
    # JAX's rule: the first node of the step, port 61440 + job id mod 4096; never pinned to one GPU
    assert spec == MultiHost(coordinator="gpu017:61441", num_processes=4, process_id=2, source="jax:slurm")
    monkeypatch.setenv(mh.ENV_COORDINATOR, "head:9000")  # chipcheck's variables win over detection
    monkeypatch.setenv(mh.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(mh.ENV_PROCESS_ID, "1")
    assert MultiHost.resolve() == MultiHost(coordinator="head:9000", num_processes=2, process_id=1,
                                            source="environment")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert MultiHost.detect() is None  # a one-task job is a single-host run
