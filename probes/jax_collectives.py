"""The collectives probe through JAX/XLA: psum, pmax, all_gather, psum_scatter, all_to_all and a
ppermute ring via shard_map on a one-axis mesh: over the devices of this host, or over every
device of a multi-host job (jax.distributed; fleet/jax_multihost.py).

Golden semantics are the torch path's, reused rather than restated: each rank's inputs, the exact
expected output, the comparison (oracles.compare_bits on the host copy), the decoding ("missing
the contribution of rank(s) [2]", "holds rank 1's elem 5; expected rank 2's") and the blame rule
(a rank the decoding names is wrong; ranks that only observed it are not) all come from
probes/collectives.py (`CollectiveStep`, `Code`, `bus_factor`). Only the collective itself runs in JAX.

| torch.distributed            | JAX (inside shard_map, axis "x")          |
| all_reduce SUM / MAX          | lax.psum / lax.pmax                       |
| all_gather_into_tensor        | lax.all_gather(tiled=True)                |
| reduce_scatter_tensor         | lax.psum_scatter(tiled=True)              |
| all_to_all_single             | lax.all_to_all(tiled=True)                |
| batch_isend_irecv ring        | lax.ppermute(perm=[(i, i+1 mod n)])       |

`broadcast` has no JAX collective of its own and is not run here. One SPMD program covers every
device of the job (JAX's one-process-per-host model): each process builds the global input from
its own ranks' rows only (make_array_from_single_device_arrays), reads only its own ranks'
outputs, and the processes exchange each rank's small view (saw a mismatch; which ranks its
decoding names) before collectives.blame judges, as the torch path's all_gather_object does.
Timings are the collective's as this process measures it, the same for each of its ranks.
Value faults corrupt a rank's *outgoing* contribution (its input shard) on the host before the
collective, as the torch path's c10d faults corrupt the outgoing payload; a `slow` rank slows
the collective for every rank of the job (its factor is shared, as a real straggler's wait is).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..results import Mismatch
from . import jax_backend as jb
from .base import CaseOutcome, InvalidConfig
from .collectives import EXACT_LIMIT, KEEP, CollectivesProbe, CollectiveStep, blame, bus_factor
from .keeping import keep

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
             injectors: Sequence[jb.Injector] | Mapping[int, jb.Injector]) -> list[CaseOutcome]:
    """One collectives case over `devices` (rank = position), all driven by this process; one
    CaseOutcome per rank. A mesh that spans processes needs `run_ranks`."""
    import jax

    remote = sum(d.process_index != jax.process_index() for d in devices)
    if remote:
        raise InvalidConfig(f"collectives case {case}: {remote} of {len(devices)} devices belong to other "
                            "processes; a multi-host run calls jax_collectives.run_ranks in every process")
    outs = run_ranks(devices, cfg, case, injectors)
    return [outs[r] for r in range(len(devices))]


def run_ranks(devices: list[Any], cfg: CollectivesProbe.Config, case: str,
              injectors: Sequence[jb.Injector] | Mapping[int, jb.Injector]) -> dict[int, CaseOutcome]:
    """One collectives case over `devices` (global rank = position), possibly spanning processes.

    Every process of the job calls it with the same devices (in the same order: see
    jax_devices.discover_global), cfg and case. Each feeds only its own devices' inputs, reads
    only their outputs, then every process exchanges the per-rank views (saw a mismatch, which
    ranks its decoding names) so that collectives.blame judges each rank with all of them.
    `injectors[r]` is global rank r's; only this process's ranks' are used. Returns the outcomes
    of this process's ranks, keyed by global rank; the timings are this process's.
    """
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
    me = jax.process_index()
    local = [r for r, d in enumerate(devices) if d.process_index == me]
    if not local:
        raise InvalidConfig(f"collectives case {case}: none of the {n} devices belongs to process {me}")
    mesh = Mesh(np.array(devices), (AXIS,))
    sharding = NamedSharding(mesh, P(AXIS))
    fn = program(op, mesh)
    tdt = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdt).element_size()
    outs = {r: CaseOutcome(case=case, params={"op": op, "dtype": dtype, "world_size": n, "sizes": [],
                                              "backend": "jax", "jax_op": JAX_OPS[op]}) for r in local}
    pos = {d: i for i, d in enumerate(devices)}
    checked: list[dict[int, tuple[CollectiveStep, Mismatch | None]]] = []  # per check: this process's ranks
    sizes: list[int] = []
    size = cfg.min_bytes
    while size <= cfg.max_bytes:
        count = max(n, size // esize)
        count -= count % n
        steps = {r: CollectiveStep(op=op, n=n, r=r, count=count, dtype=dtype, tdt=tdt, device="cpu", group=None)
                 for r in local}
        for _ in range(cfg.checks):
            inputs = {}
            for r, s in steps.items():
                s.init()
                injectors[r].begin(JAX_OPS[op])
                inputs[r] = injectors[r].corrupt(_to_np(_payload(s)).copy())
            y = fn(_global(inputs, sharding, pos, n))
            jax.block_until_ready(y)
            for shard in y.addressable_shards:
                steps[pos[shard.device]].buf = _to_torch(np.array(shard.data)[0])
            # judged once every process's views are in (after the last size); suspects() and the
            # blame need only the step's shape (op, rank, count), which the next check keeps
            checked.append({r: (s, s.check()) for r, s in steps.items()})
        x = _global({r: _to_np(_payload(s)) for r, s in steps.items()}, sharding, pos, n)
        jax.block_until_ready(fn(x))  # compiled and warm before timing
        # a slow rank slows the collective for every rank: the slowest factor of the job applies
        local_factors = [max(injectors[r].begin(JAX_OPS[op]) for r in local) for _ in range(cfg.timed_loops)]
        factors = _allmax(local_factors)
        loops = []
        for factor in factors:
            _, dt = jb.timed(lambda x=x: [fn(x) for _ in range(cfg.iters)])
            loops.append((dt + jb.stall(dt * (factor - 1.0))) / cfg.iters)
        nbytes = count * esize
        sizes.append(nbytes)
        t_best, t_med = min(loops), statistics.median(loops)
        for out in outs.values():
            out.params["sizes"].append(nbytes)
            out.metrics[f"{nbytes}B:time_us"] = t_med * 1e6
            out.metrics[f"{nbytes}B:algbw_gbps"] = nbytes / t_med / 1e9
            out.metrics[f"{nbytes}B:busbw_gbps"] = nbytes / t_med / 1e9 * bus_factor(op, n)
            out.metrics["busbw_gbps"] = nbytes / t_med / 1e9 * bus_factor(op, n)
            out.metrics["busbw_gbps_best"] = nbytes / t_best / 1e9 * bus_factor(op, n)
        size *= cfg.factor
    views = _exchange(devices, case, checked)
    for i in range(len(sizes)):
        bad = dict.fromkeys(local, False)
        for c in range(cfg.checks):
            k = i * cfg.checks + c
            for r, b in _judge(outs, checked[k], views[k]).items():
                bad[r] |= b
        for r, out in outs.items():
            out.repeats += 1
            out.repeats_bad += int(bad[r])
    return outs


def _global(inputs: dict[int, np.ndarray], sharding: Any, pos: dict[Any, int], n: int) -> Any:
    """The (n, L) global array, sharded by rows, from this process's rows only."""
    import jax

    length = next(iter(inputs.values())).shape[0]
    shape = (n, length)
    bufs = [jax.device_put(inputs[pos[d]][None], d) for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, bufs)


def _allmax(values: list[float]) -> list[float]:
    """Element-wise max of `values` over every process of the job (a collective)."""
    import jax

    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(np.asarray(values, dtype=np.float32)))
    return [float(v) for v in got.reshape(-1, len(values)).max(axis=0)]


def _exchange(devices: list[Any], case: str, checked: list[dict[int, tuple[CollectiveStep, Mismatch | None]]]
              ) -> list[list[tuple[bool, list[int]]]]:
    """Every rank's view (saw a mismatch, ranks its decoding names) for every check, from every process.

    Each process sends a fixed-size bit array: a header (a hash of the case and the device
    order, so processes that ran different programs fail loudly rather than judge each other's
    views), then per check and per own rank 1 + n bits.
    """
    import zlib

    import jax

    n = len(devices)
    owner = [int(d.process_index) for d in devices]
    ranks_of = {p: [r for r in range(n) if owner[r] == p] for p in sorted(set(owner))}
    width = max(len(v) for v in ranks_of.values())  # processes with fewer ranks pad their rows
    sig = zlib.crc32(f"{case}|{len(checked)}|{[int(d.id) for d in devices]}".encode())
    bits = np.zeros((len(checked), width, 1 + n), dtype=bool)
    for k, views in enumerate(checked):
        for j, r in enumerate(ranks_of[jax.process_index()]):
            s, m = views[r]
            if m is not None:
                bits[k, j, 0] = True
                bits[k, j, 1 + np.asarray([x for x in s.suspects(m) if 0 <= x < n], dtype=np.int64)] = True
    mine = np.concatenate([np.frombuffer(np.uint32(sig).tobytes(), dtype=np.uint8), np.packbits(bits.reshape(-1))])
    if jax.process_count() == 1:
        rows = mine[None]
    else:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    sigs = {int(np.frombuffer(row[:4].tobytes(), dtype=np.uint32)[0]) for row in rows}
    if len(sigs) != 1:
        raise InvalidConfig(f"collectives case {case}: the processes ran different cases or device orders "
                            "(every process must call run_ranks with the same devices, cfg and case)")
    out: list[list[tuple[bool, list[int]]]] = [[(False, [])] * n for _ in checked]
    for p, ranks in ranks_of.items():
        got = np.unpackbits(rows[p, 4:], count=bits.size).astype(bool).reshape(bits.shape)
        for k in range(len(checked)):
            for j, r in enumerate(ranks):
                out[k][r] = (bool(got[k, j, 0]), [int(s) for s in np.flatnonzero(got[k, j, 1:])])
    return out


def _payload(s: CollectiveStep) -> Any:
    """What rank `s.r` contributes (the torch path's input buffer for this op)."""
    return s.buf if s.op in ("all_reduce_sum", "all_reduce_max") else s.inp


def _judge(outs: dict[int, CaseOutcome], checked: dict[int, tuple[CollectiveStep, Mismatch | None]],
           views: list[tuple[bool, list[int]]]) -> dict[int, bool]:
    """collectives.blame for this process's ranks in one check, given every rank's view."""
    result = {}
    for r, (s, m) in checked.items():
        kept, observed = blame(r, m, views, tensor=s.op, count=s.count)
        if observed:
            outs[r].params.setdefault("observed", []).append(observed)
        if kept is not None:
            keep(outs[r], kept, KEEP)
        result[r] = kept is not None
    return result
