"""Every collective of a multi-rank capture checked against the exact result of what its ranks sent.

Replay substitutes a collective's recorded outputs on each rank (reproducers/replay.py); with every
rank's replay at hand, `check_collectives` lines up each call across the ranks of its group (a
subgroup's calls by its own order), recomputes its exact result on the host from every rank's
recorded input (all-reduce, all-gather, reduce-scatter, broadcast, all-to-all, even or not; a send
against its receive) and returns the first call some rank ended with something else: where a bad link
or a bad chip's collective shows.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

import torch

from ..probes.backends import backend_of, oracles
from ..probes.backends.base import INT_BY_WIDTH
from . import format as fmt
from . import replay as rp
from .reduction import exact_result

CHECKED_REDUCTIONS = ("sum", "avg", "product", "min", "max")


def collective_kind(op: str) -> str | None:
    """all_reduce, all_gather, reduce_scatter, broadcast or all_to_all for a c10d or functional
    collective's overload name (`c10d._allgather_base_.default`, ...; c10d's coalesced forms are their
    collective over several tensors, as are the functional coalesced forms; c10d's list form of alltoall
    is an uneven all-to-all); None for an op that is not one of these."""
    name = op.split(".")[1] if op.count(".") >= 2 else op
    for kind, spellings in (("all_reduce", ("allreduce", "all_reduce")), ("all_gather", ("allgather", "all_gather")),
                            ("reduce_scatter", ("reduce_scatter",)), ("broadcast", ("broadcast",)),
                            ("all_to_all", ("alltoall", "all_to_all"))):
        if any(name.lstrip("_").startswith(w) for w in spellings):
            return kind
    return None


def _payload(kind: str, op: str, ins: list[Any], outs: list[Any]) -> list[tuple[list[int], Any]]:
    """(positions in `ins` of what this rank contributed, what it ended with) per tensor of the call.
    c10d ops list their outputs first (`allgather_(outputs, input)`, `_reduce_scatter_base_(output,
    input)`); in-place ones (all_reduce, broadcast) hold the value before the call in `ins` and after
    it in `outs`."""
    if kind in ("all_reduce", "broadcast"):
        return [([j], o) for j, o in enumerate(outs[:len(ins)])]
    if not outs:
        return []
    if "coalesced" in op and op.startswith("c10d."):  # `allgather_into_tensor_coalesced_(outputs, inputs)`
        return [([len(outs) + j], o) for j, o in enumerate(outs)] if len(ins) == 2 * len(outs) else []
    if "coalesced" in op:  # functional: `all_gather_into_tensor_coalesced(inputs, ...)` returns one per input
        return [([j], o) for j, o in enumerate(outs)] if len(ins) == len(outs) else []
    listed = kind == "all_gather" or _listed_a2a(op)  # a list of outputs, one per group rank
    out = torch.cat([o.reshape(-1) for o in outs]) if listed else outs[0]
    if not op.startswith("c10d."):
        return [([0], out)]
    first = len(outs) if listed else 1
    return [(list(range(first, len(ins))), out)] if len(ins) > first else []


def _a2a_splits(rec: fmt.OpRecord) -> tuple[list[int], list[int]]:
    """An all-to-all's (output, input) split sizes, rows of dim 0 per group rank ([] for equal chunks):
    `alltoall_base_(output, input, pg, output_split_sizes, input_split_sizes, timeout)` or the
    functional `all_to_all_single(input, output_split_sizes, input_split_sizes, group)`."""
    i = 3 if rec.op.startswith("c10d.") else 1
    got = [a if isinstance(a, list) and all(isinstance(x, int) for x in a) else None for a in rec.args[i:i + 2]]
    return (got[0] or [], got[1] or []) if len(got) == 2 else ([], [])


def _listed_a2a(op: str) -> bool:
    """c10d's list form, `alltoall_(outputs, inputs, pg, timeout)`: input k goes to rank k, output j
    comes from rank j; the tensors' sizes are its split sizes (in elements: it is checked flattened)."""
    return op.split(".")[1:2] == ["alltoall_"]


def _a2a_layout(recs: list[fmt.OpRecord], ins: list[Any],
                listed: list[tuple[list[int], list[int]]] | None = None) -> list[list[int]] | None:
    """Every group rank's input split sizes, None for equal chunks; raises ValueError when the ranks'
    recorded splits do not fit together (what rank j sends to rank g is what g expects from j).
    `listed`: the list form's (output, input) sizes per group rank, in place of recorded splits."""
    pairs = listed or [_a2a_splits(r) for r in recs]
    if not any(o or i for o, i in pairs):
        return None
    world = len(recs)
    sent = [i or [x.shape[0] // world] * world for (_, i), x in zip(pairs, ins, strict=True)]
    for g, (o, _) in enumerate(pairs):
        if len(sent[g]) != world or (o and o != [sent[j][g] for j in range(world)]):
            raise ValueError("the ranks' all-to-all split sizes do not fit together")
    return sent


def _listed_sizes(results: list[rp.ReplayResult], call: list[tuple[int, int, fmt.OpRecord]]
                  ) -> list[tuple[list[int], list[int]]] | None:
    """The list form of alltoall's (output, input) tensor sizes per group rank; None for other forms."""
    if not _listed_a2a(call[0][2].op):
        return None
    out = []
    for i, k, _ in call:
        outs = results[i].collective_outputs[k][1]
        out.append(([o.numel() for o in outs], [x.numel() for x in results[i].collective_inputs[k][1][len(outs):]]))
    return out


def _sent(ins: list[Any], where: list[int]) -> Any:
    return ins[where[0]] if len(where) == 1 else torch.cat([ins[p].reshape(-1) for p in where])


def _as_sent(cap: fmt.Capture, rec: fmt.OpRecord, ins: list[Any], where: list[int]) -> bool:
    """Is the replayed payload what the rank sent when it was captured (its recorded fingerprints)?
    When it is not (an input the capture could not rebuild), the collective cannot be judged."""
    fps = rec.in_fingerprints
    return all(p < len(fps) and fps[p] and fmt.fingerprint(ins[p], cap.fingerprint) == fps[p] for p in where)


def _source(rec: fmt.OpRecord) -> int:
    """A broadcast's source (group rank): `broadcast_(tensors, pg, root_rank, ...)` or the functional
    `broadcast(input, src, group)`."""
    i = 2 if rec.op.startswith("c10d.") else 1
    return int(rec.args[i]) if len(rec.args) > i and isinstance(rec.args[i], int) else 0


def check_collectives(results: list[rp.ReplayResult], caps: list[fmt.Capture],
                      unjudged: list[str] | None = None) -> rp.Divergence | None:
    """The first collective whose result on some rank differs from the exact host-side result of
    every group rank's input (replayed bits): an all-reduce or reduce-scatter from the exact reduction
    (its recorded op: sum, avg, product, min or max) within the roundings it may make, an all-gather,
    broadcast or all-to-all from the bytes sent, exactly, and what a receive got from the bytes its
    send sent. Calls are lined up per process group (`_calls`), so a
    capture with subgroups (TP and DP groups interleaved) is checked call by call in each group.
    A collective whose replayed payload is not what some rank sent (by the fingerprints recorded when
    it was captured) is not judged: it is listed in `unjudged`, never blamed."""
    if len(results) < 2 or not all(r.collective_inputs for r in results):
        return None
    for call in _calls(results, caps, unjudged):
        div = _check_call(results, caps, call, unjudged)
        if div is not None:
            return div
    return None


def _calls(results: list[rp.ReplayResult], caps: list[fmt.Capture],
           unjudged: list[str] | None) -> list[list[tuple[int, int, fmt.OpRecord]]]:
    """Every collective call, as (capture, k, record) of each member that made it, in group-rank order.

    Calls on one process group are ordered (one communicator), so the i-th collective on a group is the
    i-th collective of each of its members on that group. Sends and receives, which only two members
    make, are lined up apart (a pipeline stage's p2p between collectives does not shift them): the i-th
    send from one rank to another (in one group, with one tag) is the i-th receive there from it, a
    call of (sender, receiver); a receive from any source is matched by the source its work reported
    once it landed (one that had not: listed in `unjudged`). A
    group's members are the global ranks recorded with its calls (every capture where none were
    recorded). A group with a member that was not captured is not checked (listed in `unjudged`), nor
    are its calls from the first where its members disagree on the op (they no longer line up).
    Ordered by where the lowest member made each call."""
    by_index = [{o.index: o for o in cap.ops} for cap in caps]
    seqs: list[dict[str, list[tuple[int, fmt.OpRecord]]]] = []
    p2p: dict[str, dict[tuple[int, int, str, int], list[tuple[int, int, fmt.OpRecord]]]] = {"send": {}, "recv_": {}}
    for i, r in enumerate(results):
        seq: dict[str, list[tuple[int, fmt.OpRecord]]] = {}
        for k, (idx, _) in enumerate(r.collective_inputs):
            rec = by_index[i][idx]
            if fmt.is_p2p(rec.op):  # pairs a sender with a receiver, not every member: matched below
                key = _p2p_key(caps[i].rank, rec)
                if key is None:
                    if unjudged is not None:
                        unjudged.append(f"op #{rec.index} {rec.op}: its peer is not known" + (
                            " (a receive from any source that had not landed when it was recorded)"
                            if "recv_any_source_" in rec.op else ""))
                else:
                    p2p["send" if rec.op.split(".")[1] == "send" else "recv_"].setdefault(key, []).append((i, k, rec))
                continue
            seq.setdefault(str((rec.collective or {}).get("group", "")), []).append((k, rec))
        seqs.append(seq)
    where = {cap.rank: i for i, cap in enumerate(caps)}
    # the i-th send from a rank to another (one group, one tag) is the i-th receive there from it; one
    # whose peer was not captured has no partner
    recvs = p2p["recv_"]
    calls: list[list[tuple[int, int, fmt.OpRecord]]] = [
        [sent, got] for key, sends in p2p["send"].items() for sent, got in zip(sends, recvs.get(key, []), strict=False)]
    for group in sorted({g for s in seqs for g in s}):
        first = next(s[group][0][1] for s in seqs if group in s)
        ranks = [int(x) for x in (first.collective or {}).get("ranks", [])]
        if ranks and any(x not in where for x in ranks):
            if unjudged is not None:
                unjudged.append(f"group {group or '(default)'}: rank(s) "
                                f"{sorted(x for x in ranks if x not in where)} not captured")
            continue
        members = [where[x] for x in ranks] if ranks else [i for i, s in enumerate(seqs) if group in s]
        if len(members) < 2 or any(group not in seqs[m] for m in members):
            continue
        for j in range(min(len(seqs[m][group]) for m in members)):
            call = [(m, *seqs[m][group][j]) for m in members]
            if len({rec.op for _, _, rec in call}) != 1:
                break  # the members' j-th calls differ: the order no longer lines up
            calls.append(sorted(call, key=lambda c: int((c[2].collective or {}).get("rank", c[0]))))
    return sorted(calls, key=lambda c: min(k for _, k, _ in c))


def _p2p_key(rank: int, rec: fmt.OpRecord) -> tuple[int, int, str, int] | None:
    """(sender, receiver, group, tag), global ranks, of `send(tensors, pg, dst, tag)` or
    `recv_(tensors, pg, src, tag)` made by global rank `rank`, or of `recv_any_source_(tensors, pg, tag)`
    by the source its work reported (recorded at capture); None when the peer is not known."""
    info = rec.collective or {}
    ranks = [int(x) for x in info.get("ranks", [])]
    if rec.op.split(".")[1] == "recv_any_source_":
        peer_arg, tag_arg = info.get("source"), rec.args[2] if len(rec.args) > 2 else 0
    elif len(rec.args) >= 4:
        peer_arg, tag_arg = rec.args[2], rec.args[3]
    else:
        return None
    if not isinstance(peer_arg, int):
        return None
    peer = ranks[peer_arg] if ranks and peer_arg < len(ranks) else peer_arg
    tag = tag_arg if isinstance(tag_arg, int) else 0
    group = str(info.get("group", ""))
    return (rank, peer, group, tag) if rec.op.split(".")[1] == "send" else (peer, rank, group, tag)


def _check_p2p(results: list[rp.ReplayResult], caps: list[fmt.Capture], call: list[tuple[int, int, fmt.OpRecord]],
               unjudged: list[str] | None) -> rp.Divergence | None:
    """A send and its receive: what arrived (recorded at capture) against what the sender sent (its
    replayed payload, when that is what it sent: its recorded fingerprint), bit for bit."""
    (si, sk, srec), (ri, rk, rrec) = call
    ins = results[si].collective_inputs[sk][1]
    outs = results[ri].collective_outputs[rk][1]
    why = ("the receive was recorded before it landed (an irecv not yet waited for)"
           if not (rrec.collective or {}).get("complete") else
           "the sender's replayed payload is not what it sent" if not ins or not _as_sent(caps[si], srec, ins, [0]) else
           "what arrived differs in shape or dtype from what was sent"
           if not outs or outs[0].shape != ins[0].shape or outs[0].dtype != ins[0].dtype else
           "no integer of its element's width to rp.compare bits with" if ins[0].element_size() not in INT_BY_WIDTH
           else "")
    if why:
        if unjudged is not None:
            unjudged.append(f"op #{rrec.index} {rrec.op} on rank {caps[ri].rank}: {why}")
        return None
    sent, got = ins[0], outs[0]
    bk = backend_of(got)
    bad = bk.bits(sent.reshape(-1)) != bk.bits(got.reshape(-1))
    if not bool(bad.any()):
        return None
    mm = oracles.compare_bits(bk, sent.reshape(-1)[bad], got.reshape(-1)[bad], tensor="out")
    err = (got.double() - sent.double()).abs().reshape(-1)[bad]
    src, dst = caps[si].rank, caps[ri].rank
    m = rp.Metric(cls="wrong", max_abs=float(err.max()), bad=int(bad.sum()), total=got.numel(),
               bad_indices=rp.bad_positions(bad.reshape(got.shape)), flipped_bits=dict(mm.bit_histogram) if mm else {},
               message=f"what rank {dst} received from rank {src} differs from what rank {src} sent, bit for bit "
                       f"(the link between them or either end's NIC)")
    return rp.Divergence(rank=dst, index=rrec.index, op=rrec.op, output=0, metric=m, device=caps[ri].device,
                      reference="host-exact", stack=rrec.stack, inputs=[sent, torch.zeros_like(sent)],
                      collective="send_recv", source=0, members=[src, dst])


def _check_call(results: list[rp.ReplayResult], caps: list[fmt.Capture], call: list[tuple[int, int, fmt.OpRecord]],
                unjudged: list[str] | None) -> rp.Divergence | None:
    """One lined-up collective call (its members in group-rank order; a send and its receive, in that
    order) against its exact result."""
    if fmt.is_p2p(call[0][2].op):
        return _check_p2p(results, caps, call, unjudged)
    recs = [rec for _, _, rec in call]
    kind = collective_kind(recs[0].op)
    red = str((recs[0].collective or {}).get("reduce_op", "sum")) if kind in ("all_reduce", "reduce_scatter") else ""
    if kind is None or (red and red not in CHECKED_REDUCTIONS):
        # reduce/gather/scatter to one root, bitwise reductions of integers: listed, never silently passed
        if unjudged is not None and "barrier" not in recs[0].op:  # a barrier moves no data
            unjudged.append(f"op #{recs[0].index} {recs[0].op}: " +
                            ("not a collective this check knows" if kind is None else f"the {red} reduction is not checked"))
        return None
    ins = [results[i].collective_inputs[k][1] for i, k, _ in call]
    parts = [_payload(kind, rec.op, results[i].collective_inputs[k][1], results[i].collective_outputs[k][1])
             for i, k, rec in call]
    src = _source(recs[0])
    for j in range(min(len(p) for p in parts)):
        sent = [_sent(x, p[j][0]) for x, p in zip(ins, parts, strict=True)]
        try:
            splits = _a2a_layout(recs, sent, _listed_sizes(results, call)) if kind == "all_to_all" else None
        except ValueError:
            if unjudged is not None:
                unjudged.append(f"op #{recs[0].index} {recs[0].op}: split sizes do not fit together")
            continue
        needed = [src] if kind == "broadcast" else range(len(call))
        if not all(g < len(call) and _as_sent(caps[call[g][0]], recs[g], ins[g], parts[g][j][0]) for g in needed):
            if unjudged is not None:
                unjudged.append(f"op #{recs[0].index} {recs[0].op}: a replayed payload is not what was sent")
            continue
        for g, (i, _, rec) in enumerate(call):
            act = parts[g][j][1]
            u = 2.0 ** -rp.MANTISSA.get(act.dtype, 53)
            exp64, tol = exact_result(kind, red, [x.double() for x in sent], g, src, u, splits)
            got = act.reshape(-1).double()
            if got.shape != exp64.shape:
                continue  # a layout this check does not know: not judged
            err = (got - exp64).abs()
            bad = ~((err <= tol) | (got == exp64) | (torch.isnan(got) & torch.isnan(exp64)))
            if bool(bad.any()):
                mm = oracles.compare_bits(backend_of(act), exp64.to(act.dtype)[bad], act.reshape(-1)[bad], tensor="out")
                what = f"{kind} ({red})" if red else kind
                exact = f"the exact {red} of every rank's input" if red else "what the ranks sent, bit for bit"
                if kind in ("all_gather", "all_to_all"):  # which sender's part arrived wrong (group ranks)
                    ends = _part_ends(kind, sent, g, splits)
                    senders = sorted({bisect.bisect_right(ends, int(x)) for x in bad.nonzero().reshape(-1).tolist()})
                    exact += f" (wrong in the part{'s' if len(senders) > 1 else ''} from rank " \
                             f"{', '.join(map(str, senders))})"
                m = rp.Metric(cls="wrong", max_abs=float(err[bad].max()), bad=int(bad.sum()), total=got.numel(),
                           bad_indices=rp.bad_positions(bad.reshape(act.shape) if bad.numel() == act.numel() else bad),
                           flipped_bits=dict(mm.bit_histogram) if mm else {},
                           message=f"{what} result differs from {exact}")
                cap = caps[i]
                return rp.Divergence(rank=cap.rank, index=rec.index, op=rec.op, output=j, metric=m,
                                  device=cap.device, reference="host-exact", stack=rec.stack,
                                  inputs=sent, reduce_op=red, collective=kind, source=_source(rec), splits=splits,
                                  members=[caps[m].rank for m, _, _ in call])
    return None


def _part_ends(kind: str, sent: list[Any], rank: int, splits: list[list[int]] | None) -> list[int]:
    """Where each sender's part of group rank `rank`'s all-gather or all-to-all result ends (flat
    elements, cumulative, in sender order)."""
    if kind == "all_gather":
        return list(itertools.accumulate(x.numel() for x in sent))
    sizes = []
    for j, x in enumerate(sent):
        rows = x.shape[0] if x.dim() else 1
        sizes.append(x.numel() // max(rows, 1) * (splits[j][rank] if splits else rows // len(sent)))
    return list(itertools.accumulate(sizes))
