"""The collectives probe through JAX/XLA: psum, pmax, all_gather, psum_scatter, all_to_all and a
ppermute ring over the devices of this host, via shard_map on a one-axis mesh.

Golden semantics are the torch path's, reused rather than restated: each rank's inputs, the exact
expected output, the comparison (oracles.compare_bits on the host copy), the decoding ("missing
the contribution of rank(s) [2]", "holds rank 1's elem 5; expected rank 2's") and the blame rule
(a rank the decoding names is wrong; ranks that only observed it are not) all come from
probes/collectives.py (`_Step`, `Code`, `bus_factor`). Only the collective itself runs in JAX.

| torch.distributed            | JAX (inside shard_map, axis "x")          |
| all_reduce SUM / MAX          | lax.psum / lax.pmax                       |
| all_gather_into_tensor        | lax.all_gather(tiled=True)                |
| reduce_scatter_tensor         | lax.psum_scatter(tiled=True)              |
| all_to_all_single             | lax.all_to_all(tiled=True)                |
| batch_isend_irecv ring        | lax.ppermute(perm=[(i, i+1 mod n)])       |

`broadcast` has no JAX collective of its own and is not run here. One SPMD program covers every
device of the host (JAX's one-process-per-host model), so the timings are the collective's, the
same for every rank. Value faults corrupt a rank's *outgoing* contribution (its input shard) on the
host before the collective, as the torch path's c10d faults corrupt the outgoing payload.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from . import jax_backend as jb
from .base import CaseOutcome, InvalidConfig
from .collectives import EXACT_LIMIT, CollectivesProbe, _keep, _Step, blame, bus_factor

# op -> the JAX op name `--inject op=` matches
JAX_OPS = {"all_reduce_sum": "psum", "all_reduce_max": "pmax", "all_gather": "all_gather",
           "reduce_scatter": "psum_scatter", "all_to_all": "all_to_all", "sendrecv_ring": "ppermute"}
AXIS = "x"


def cases(cfg: CollectivesProbe.Config) -> list[str]:
    return [f"{op}/{dt}" for op in cfg.ops if op in JAX_OPS for dt in cfg.dtypes]


def _shard_map(f: Any, mesh: Any, spec: Any) -> Any:
    import jax

    if hasattr(jax, "shard_map"):  # jax >= 0.6
        return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)
    from jax.experimental.shard_map import shard_map  # jax 0.4.30 .. 0.5

    return shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)


def program(op: str, mesh: Any) -> Any:
    """The jitted SPMD collective: (n, L) sharded by rows -> (n, L') sharded by rows."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    n = mesh.devices.size

    def body(x: Any) -> Any:  # x: this device's (1, L) block
        v = x[0]
        if op == "all_reduce_sum":
            r = lax.psum(v, AXIS)
        elif op == "all_reduce_max":
            r = lax.pmax(v, AXIS)
        elif op == "all_gather":
            r = lax.all_gather(v, AXIS, tiled=True)
        elif op == "reduce_scatter":
            r = lax.psum_scatter(v, AXIS, scatter_dimension=0, tiled=True)
        elif op == "all_to_all":
            r = lax.all_to_all(v, AXIS, 0, 0, tiled=True)
        else:  # sendrecv_ring: rank i sends to i + 1, receives from i - 1
            r = lax.ppermute(v, AXIS, perm=[(i, (i + 1) % n) for i in range(n)])
        return r[None]

    return jax.jit(_shard_map(body, mesh, P(AXIS)))


def _to_np(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(a: np.ndarray) -> Any:
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def run_case(devices: list[Any], cfg: CollectivesProbe.Config, case: str,
             injectors: list[jb.Injector]) -> list[CaseOutcome]:
    """One collectives case over `devices` (rank = position); one CaseOutcome per rank."""
    import jax
    import torch
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    op, _, dtype = case.partition("/")
    if op not in JAX_OPS or dtype not in EXACT_LIMIT:
        raise InvalidConfig(f"unknown collectives case {case!r} on the JAX path")
    n = len(devices)
    if n < 2:
        raise InvalidConfig("collectives need at least 2 devices")
    mesh = Mesh(np.array(devices), (AXIS,))
    sharding = NamedSharding(mesh, P(AXIS))
    fn = program(op, mesh)
    tdt = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdt).element_size()
    outs = [CaseOutcome(case=case, params={"op": op, "dtype": dtype, "world_size": n, "sizes": [],
                                           "backend": "jax", "jax_op": JAX_OPS[op]}) for _ in range(n)]
    pos = {d: i for i, d in enumerate(devices)}
    size = cfg.min_bytes
    while size <= cfg.max_bytes:
        count = max(n, size // esize)
        count -= count % n
        steps = [_Step(op=op, n=n, r=r, count=count, dtype=dtype, tdt=tdt, device="cpu", group=None) for r in range(n)]
        bad = [False] * n
        for _ in range(cfg.checks):
            inputs = []
            for r, s in enumerate(steps):
                s.init()
                injectors[r].begin(JAX_OPS[op])
                inputs.append(injectors[r].corrupt(_to_np(_payload(s)).copy()))
            x = jax.device_put(np.stack(inputs), sharding)
            y = fn(x)
            jax.block_until_ready(y)
            for shard in y.addressable_shards:
                steps[pos[shard.device]].buf = _to_torch(np.array(shard.data)[0])
            for r, b in enumerate(_judge(outs, steps)):
                bad[r] |= b
        x = jax.device_put(np.stack([_to_np(_payload(s)) for s in steps]), sharding)
        jax.block_until_ready(fn(x))  # compiled and warm before timing
        loops = []
        for _ in range(cfg.timed_loops):
            factor = max(inj.begin(JAX_OPS[op]) for inj in injectors)
            _, dt = jb.timed(lambda x=x: [fn(x) for _ in range(cfg.iters)])
            loops.append((dt + jb.stall(dt * (factor - 1.0))) / cfg.iters)
        nbytes = count * esize
        t_best, t_med = min(loops), statistics.median(loops)
        for r, out in enumerate(outs):
            out.repeats += 1
            out.repeats_bad += int(bad[r])
            out.params["sizes"].append(nbytes)
            out.metrics[f"{nbytes}B:time_us"] = t_med * 1e6
            out.metrics[f"{nbytes}B:algbw_gbps"] = nbytes / t_med / 1e9
            out.metrics[f"{nbytes}B:busbw_gbps"] = nbytes / t_med / 1e9 * bus_factor(op, n)
            out.metrics["busbw_gbps"] = nbytes / t_med / 1e9 * bus_factor(op, n)
            out.metrics["busbw_gbps_best"] = nbytes / t_best / 1e9 * bus_factor(op, n)
        size *= cfg.factor
    return outs


def _payload(s: _Step) -> Any:
    """What rank `s.r` contributes (the torch path's input buffer for this op)."""
    return s.buf if s.op in ("all_reduce_sum", "all_reduce_max") else s.inp


def _judge(outs: list[CaseOutcome], steps: list[_Step]) -> list[bool]:
    """collectives.blame for every rank at once (all views are in this process)."""
    ms = [s.check() for s in steps]
    views = [(m is not None, s.suspects(m) if m is not None else []) for s, m in zip(steps, ms, strict=True)]
    result = [False] * len(steps)
    for r, (s, m) in enumerate(zip(steps, ms, strict=True)):
        keep, observed = blame(r, m, views, tensor=s.op, count=s.count)
        if observed:
            outs[r].params.setdefault("observed", []).append(observed)
        if keep is not None:
            _keep(outs[r], keep)
            result[r] = True
    return result
