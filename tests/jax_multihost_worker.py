"""One process of a multi-host JAX job on this machine (driven by tests/test_jax_multihost.py).

    python tests/jax_multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID

Joins the job (chipcheck.fleet.jax_multihost), discovers the global devices, runs every JAX
collectives case clean over the global mesh, then with faults on chosen global ranks, and prints
one JSON line: the discovery as this process saw it and the outcomes of its own ranks.
XLA_FLAGS (forced host device count) and JAX_PLATFORMS come from the environment.
"""

from __future__ import annotations

import json
import sys

from chipcheck.fleet import jax_devices, jax_multihost
from chipcheck.probes import faults
from chipcheck.probes import jax_backend as jb
from chipcheck.probes import jax_collectives as jc
from chipcheck.probes.base import InvalidConfig
from chipcheck.probes.collectives import CollectivesProbe

CFG = CollectivesProbe.Config(min_bytes=256, max_bytes=16384, factor=64, iters=1, timed_loops=1, checks=2)
FAULTY = {  # name: (case, --inject spec)
    # rank 2 (process 1) flips bit 20 of its float32 psum contribution at element 32: 36.0 -> 32.0,
    # exactly its 2**2 part, so every rank decodes "missing the contribution of rank(s) [2]"
    "psum": ("all_reduce_sum/float32", "bitflip:rank=2,bit=20,index=32,op=psum"),
    # rank 1 (process 0) corrupts what it sends round the ring: only rank 2 (process 1) sees it
    "ring": ("sendrecv_ring/int32", "bitflip:rank=1,bit=4,index=3"),
    # rank 2's chunk arrives with bit 20 flipped in every rank's gathered copy
    "gather": ("all_gather/float32", "bitflip:rank=2,bit=20,index=1,op=all_gather"),
    # the root, rank 0 (process 0), broadcasts bit 20 flipped at element 1: every rank of both processes
    # receives it and names the root
    "bcast": ("broadcast/float32", "bitflip:rank=0,bit=20,index=1,op=broadcast"),
    # rank 2 is 100x slow: the collective is slow for every rank, process 0's too
    "slow": ("all_reduce_sum/int32", "slow:rank=2,factor=100"),
}


def main(coordinator: str, num_processes: int, process_id: int) -> None:
    spec = jax_multihost.MultiHost(coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                                   timeout_s=60, heartbeat_timeout_s=10)
    jax_multihost.initialize(spec)
    jax_multihost.initialize(spec)  # joining again with the same spec is a no-op
    try:
        jax_multihost.initialize(jax_multihost.MultiHost(coordinator=coordinator, num_processes=num_processes + 1,
                                                         process_id=process_id))
        rejoin = "accepted"
    except jax_multihost.MultiHostError as e:
        rejoin = str(e)
    jb.init()
    g = jax_devices.discover_global(host=f"host{process_id}")  # distinct names, as on distinct hosts
    res: dict = {"process": g.process_index, "local": list(g.local), "hosts": list(g.hosts), "rejoin": rejoin,
                 "devices": [[int(d.id), int(d.process_index)] for d in g.devices],
                 "infos": [i.to_dict() for i in g.infos], "clean": {}, "faulty": {}}
    clean = [jb.Injector([]) for _ in g.devices]
    for case in jc.cases(CFG):
        outs = jc.run_ranks(g.devices, CFG, case, clean)
        res["clean"][case] = {r: {"verdict": o.verdict.value, "busbw": o.metrics["busbw_gbps"],
                                  "time_us": o.metrics["256B:time_us"], "repeats": [o.repeats, o.repeats_bad]}
                              for r, o in outs.items()}
    for name, (case, spec_text) in FAULTY.items():
        fl = faults.parse(spec_text)
        outs = jc.run_ranks(g.devices, CFG, case,
                            {r: jb.Injector.for_rank(fl, r, "collectives") for r in g.local})
        res["faulty"][name] = {r: {"verdict": o.verdict.value, "notes": [m.note for m in o.mismatches],
                                   "bits": [m.bit_histogram for m in o.mismatches],
                                   "observed": o.params.get("observed", []), "time_us": o.metrics["256B:time_us"],
                                   "repeats": [o.repeats, o.repeats_bad]}
                               for r, o in outs.items()}
    try:
        jc.run_case(g.devices, CFG, "all_reduce_sum/int32", clean)
        res["run_case"] = "accepted"
    except InvalidConfig as e:  # the single-process API refuses a mesh spanning processes, before running
        res["run_case"] = str(e)
    print(json.dumps(res, default=str), flush=True)
    jax_multihost.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
