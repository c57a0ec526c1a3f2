"""The data-parallel checks of `model_dp`: the gradient cross-check (with the resolution that names
the bad chip of a dispute) and the replica check of every rank's parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ...results import Blame, Mismatch, Oracle
from ..backends import backend_of, oracles
from ..base import ProbeContext
from .checks import checksum


@dataclass(slots=True)
class Named:
    """Why this rank was named in one step (a cross-check dispute or a replica divergence)."""

    step: int
    mismatch: Mismatch


def all_gather(x: Any, group: Any, size: int) -> list[Any]:
    """`x` from every rank of `group` (of `size` ranks), in rank order."""
    import torch.distributed as dist

    parts = [x.new_empty(x.shape) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def cross_check(ctx: ProbeContext, tr: Any, par: Any, step: int, own: list[Any], chk: list[Any], *,
                shard_data: Callable[[int], tuple[Any, Any]], named: list[Named],
                stats: dict[str, int]) -> list[Any]:
    """Compare every shard's gradient as computed by its owner and by its checker (the rank before
    it); resolve disagreements. Returns this rank's contribution to the all-reduce."""
    import torch

    mine = torch.stack([checksum(own), checksum(chk), checksum(tr.params)])
    table = torch.stack(all_gather(mine, par.dp_group, par.dp_size)).cpu().tolist()
    n = par.dp_size
    disputes = [(j, (j - 1) % n) for j in range(n) if table[j][0] != table[(j - 1) % n][1]]
    for owner, checker in disputes:
        stats["disputes"] += 1
        if table[owner][2] != table[checker][2]:
            # Their replicas already differ (a split the replica check could not resolve by majority):
            # the gradients differ for that alone, and whichever lies farther from float64 by a rounding
            # proves nothing. The replica check speaks to the divergence.
            stats["diverged_disputes"] += 1
            continue
        own = _resolve(ctx, tr, par, step, owner, checker, own, chk, shard_data(owner), named)
    return own


def _resolve(ctx: ProbeContext, tr: Any, par: Any, step: int, owner: int, checker: int, own: list[Any],
             chk: list[Any], batch: tuple[Any, Any], named: list[Named]) -> list[Any]:
    """Owner and checker computed shard `owner`'s gradient with different bits: find the bad chip.

    Both recompute it. A chip whose first result is the odd one out of {own first, own rerun,
    peer's} is named; if both are self-consistent (a persistent difference) the one farther from
    a float64 recomputation is named. The good copy replaces a named owner's contribution.
    """
    import torch
    import torch.distributed as dist

    me = par.dp_rank
    sizes = [t.numel() for t in own]
    # Both first results, on every rank of the group (for the verdict and the diagnosis).
    a = torch.cat(own) if me == owner else torch.empty(sum(sizes), dtype=own[0].dtype, device=own[0].device)
    b = torch.cat(chk) if me == checker else torch.empty_like(a)
    dist.broadcast(a, src=par.dp_ranks[owner], group=par.dp_group)
    dist.broadcast(b, src=par.dp_ranks[checker], group=par.dp_group)
    rerun = torch.zeros((), dtype=torch.int64, device=a.device)
    if me in (owner, checker):
        with ctx.under_test():
            tr.forward_backward(*batch)
        rerun = checksum([torch.cat(tr.pack_grads())])
    reruns = [int(v) for v in all_gather(rerun, par.dp_group, par.dp_size)]
    ca, cb = int(checksum([a])), int(checksum([b]))
    a2, b2 = reruns[owner], reruns[checker]
    bad: set[int] = set()
    if a2 == cb and b2 == cb:
        bad, why = {owner}, "its gradient differs from the checker's copy and from its own recomputation"
    elif b2 == ca and a2 == ca:
        bad, why = {checker}, "its replay differs from the owner's gradient and from its own recomputation"
    elif a2 == ca and b2 == cb:
        err = _fp64_error(tr, par, batch, a if me == owner else b) if me in (owner, checker) else 0.0
        errs = [float(v) for v in all_gather(torch.tensor([err], dtype=torch.float64), par.dp_group, par.dp_size)]
        errs = [math.inf if math.isnan(e) else e for e in errs]  # a NaN gradient is the farthest of all
        worst = max(errs[owner], errs[checker])
        bad = {r for r in (owner, checker) if errs[r] == worst}
        why = (f"both chips repeat their own result; its error against float64 is {worst:.3g} "
               f"(owner {errs[owner]:.3g}, checker {errs[checker]:.3g})")
    else:
        bad = {r for r, first, again in ((owner, ca, a2), (checker, cb, b2)) if first != again}
        why = "it does not reproduce its own result"
    if owner in bad and checker not in bad:
        good, wrong = b, a
        if me == owner:
            own = list(b.split(sizes))  # the checker's copy stands in for the bad one
    else:
        good, wrong = a, b
    if me in bad:
        role = "owner" if me == owner else "checker"
        m = oracles.compare_bits(backend_of(wrong), good, wrong, tensor=f"grad(shard {owner})", oracle=Oracle.REPLICA)
        note = (f"data-parallel gradient cross-check: rank {par.dp_ranks[me]} ({role} of shard {owner}; peer rank "
                f"{par.dp_ranks[checker if me == owner else owner]}): {why}")
        if m is None:
            m = Mismatch(oracle=Oracle.REPLICA, tensor=f"grad(shard {owner})", bad_elements=0,
                         total_elements=a.numel())
        named.append(Named(step=step, mismatch=replace(m, note=note)))
    return own


def _fp64_error(tr: Any, par: Any, batch: tuple[Any, Any], flat: Any) -> float:
    """Max relative error of a flat gradient against a float64 recomputation on the CPU."""
    import torch

    from ...model.train import Trainer

    ref = Trainer(tr.model_cfg, replace(tr.cfg, precision="fp64", tp=1), seed=0, device="cpu")
    with torch.no_grad():
        for p64, p in zip(ref.params, tr.params, strict=True):
            p64.copy_(p.detach().double().cpu())
    ref.forward_backward(batch[0].cpu(), batch[1].cpu())
    g64 = torch.cat(ref.pack_grads())
    return float((flat.double().cpu() - g64).abs().max() / g64.abs().max().clamp_min(1e-300))


def replica_check(tr: Any, par: Any, step: int, named: list[Named], stats: dict[str, int]) -> None:
    """All-gather parameter checksums; name ranks that differ from their replicas' majority and
    (without tensor parallelism) copy the majority's state to them."""
    import torch
    import torch.distributed as dist

    repl = checksum(p for _, p in tr.model.replicated())
    shard = checksum(p for _, p in tr.model.sharded())
    table = torch.stack(all_gather(torch.stack([repl, shard]), None, par.world)).cpu().tolist()
    # replicated parameters: one class over all ranks; split ones: one class per tp rank
    classes = [(list(range(par.world)), 0, "replicated parameters")]
    classes += [(list(range(t, par.world, par.tp_size)), 1, "parameters") for t in range(par.tp_size)]
    diverged: set[int] = set()
    resync = True
    for ranks, col, what in classes:
        votes: dict[int, list[int]] = {}
        for r in ranks:
            votes.setdefault(table[r][col], []).append(r)
        if len(votes) == 1:
            continue
        top = max(votes.values(), key=len)
        majority = len(top) * 2 > len(ranks)
        for r in ranks:
            if majority and r in top:
                continue
            diverged.add(r)
            if r == par.rank:
                why = (f"data-parallel replica check: {what} of rank {r} differ from "
                       + (f"the majority ({len(top)} of {len(ranks)} ranks, e.g. rank {top[0]})" if majority
                          else f"its replicas with no majority ({len(votes)} distinct among ranks {ranks})"))
                # Without a strict majority the replicas say that one of them is bad, not which.
                named.append(Named(step=step, mismatch=Mismatch(
                    oracle=Oracle.REPLICA, tensor=what.split()[0] if col == 0 else "parameters",
                    bad_elements=1, total_elements=1, note=why,
                    blame=Blame.OWN if majority else Blame.SHARED, group=[] if majority else list(ranks))))
        resync = resync and majority
    if diverged and resync and par.tp_size == 1:
        # Re-synchronise the minority from the lowest majority rank, so one bad chip does not
        # make the rest of the run diverge (AdamW's step counters live on the host and agree).
        src = min(set(range(par.world)) - diverged)
        for t in tr.state_tensors():
            if t.device == tr.device:
                dist.broadcast(t.data, src=src)
        stats["resynced"] += len(diverged)
