"""Render a shrunk case as ONE file, `repro.py`, that runs with only torch and numpy.

Inputs are embedded as base64(zlib(bytes)) with their SHA-256 (checked on load), or regenerated from
a recipe (zeros, ones, numpy-PCG64 small integers from a seed). The file computes the expected value
on the host in float64 (or the exact host-side sum for a collective), runs the op on `--device`
`--repeat N` times, prints the metric, and exits 1 when the bug reproduces, 0 when it does not.

A failure that needs history (`render_ops`) becomes a file that replays the kept earlier ops, each on
its own embedded recorded inputs, then the failing op, and checks only that last op's output.

`--inject SPEC` is the simulation hook for testing reproducers on a healthy chip (a CPU): SPEC is
`bitflip:bit=B[,rank=R][,index=I][,op=NAME][,after=N][,count=N][,chance=P[,seed=S]]` or `nan[:...]`;
it corrupts an op's first output (`op=NAME`: only calls of that aten op count, `after=N` spares the
first N of them, `count=N` corrupts at most N, as in probes/faults/; the counter restarts every
run; `chance=P`: an intermittent fault, hit with probability P from a generator seeded by S that runs
on across the file's runs) or the rank's outgoing payload (collective), self-contained: repro.py
imports nothing from chipcheck.

An intermittent failure (it failed k of n trials while shrinking) gets a trial plan
(reproducers/trials.py): the file's default `--repeat` is the number of runs that see it with 99.9%
probability at that rate, and its header says so.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import zlib
from typing import Any

from . import format as fmt
from . import settings as st
from . import tolerance as tol
from .fused import STANDS_IN, AttentionArgs, attention_args, fused_reference
from .reduction import exact_result, reduction
from .shrink import CollectiveCase, OpCase
from .terms import cancelling_terms, terms_of
from .trials import Evidence, Rate

_COMMON = r'''
import argparse, base64, hashlib, json, sys, zlib
from typing import Any
import numpy as np
import torch

MANT = {"float32": 24, "float64": 53, "bfloat16": 8, "float16": 11}


def load(spec, device):
    """One input: embedded bytes (SHA-256 checked) or a recipe."""
    dt = getattr(torch, spec["dtype"])
    shape = spec["shape"]
    if spec["kind"] == "zeros":
        t = torch.zeros(shape, dtype=dt, device=device)
    elif spec["kind"] == "ones":
        t = torch.ones(shape, dtype=dt, device=device)
    elif spec["kind"] == "ints":
        vals = np.random.default_rng(spec["seed"]).integers(-4, 5, size=shape).astype(np.float64)
        t = torch.from_numpy(vals).to(device=device, dtype=dt)
    else:
        raw = zlib.decompress(base64.b64decode(spec["data"]))
        if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
            sys.exit("repro.py: embedded input corrupted (SHA-256 mismatch)")
        t = torch.frombuffer(bytearray(raw), dtype=dt).reshape(shape).to(device)
    return laid_out(t, spec.get("order"))  # the dims' order in memory as the op was given them


__LAYOUT__


_DRAWS = {}


def parse_inject(spec):
    """The simulation hook: bitflip:bit=B[,rank=R][,index=I][,output=K][,op=NAME][,after=N][,count=N]
    [,chance=P[,seed=S]] or nan[:...] (`output`: which floating-point output, counting from 0)."""
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    kv = dict(p.split("=", 1) for p in rest.split(",") if p)
    chance, seed = float(kv.get("chance", 1)), int(kv.get("seed", 0))
    import random
    rng = _DRAWS.setdefault((seed, chance), random.Random(f"repro-chance:{seed}"))  # runs on across runs
    return {"kind": kind, "bit": int(kv.get("bit", 0)), "rank": int(kv.get("rank", -1)),
            "index": int(kv.get("index", 0)), "output": int(kv.get("output", 0)), "op": kv.get("op"), "after": int(kv.get("after", 0)),
            "count": int(kv.get("count", 0)), "calls": 0, "chance": chance, "rng": rng}


def hit(fault, name):
    """Count a call of aten op `name` that the fault matches (op=NAME: only that op; else every op);
    True when it is corrupted: the first `after` matching calls are spared, then at most `count`."""
    if fault is None or (fault["op"] and fault["op"] != name):
        return False
    n = fault["calls"]
    fault["calls"] = n + 1
    if n < fault["after"] or (fault["count"] and n >= fault["after"] + fault["count"]):
        return False
    return fault["chance"] >= 1 or fault["rng"].random() < fault["chance"]


def corrupt(t, fault, rank=0):
    if fault is None or fault["rank"] not in (-1, rank):
        return
    t = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))  # `index` counts in memory order
    flat = t.view(-1)
    i = fault["index"] % flat.numel()
    if fault["kind"] == "nan":
        flat[i] = float("nan")
        return
    ints = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    bit = 1 << fault["bit"]
    if bit >= 1 << (8 * t.element_size() - 1):
        bit -= 1 << (8 * t.element_size())
    ints[i] ^= bit


def metric(actual, expected, rtol, magnitude=None):
    """Bad elements, max abs / rel / ULP error and flipped bits of `actual` against float64 `expected`
    (a sum's tolerance also scales with `magnitude`, the op on its inputs' absolute values)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    err = (a - e).abs()
    bad = outside_tolerance(actual, expected, rtol, magnitude)
    n = int(bad.sum())
    if n == 0:
        return 0, "agrees with the expected value"
    dt = actual.dtype
    width = actual.element_size() * 8
    iv = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    xor = (actual.detach().cpu()[bad].view(iv) ^ e[bad].to(dt).view(iv)).long()
    bits = {b: int(((xor >> b) & 1).sum()) for b in range(width) if int(((xor >> b) & 1).sum())}
    eb = err[bad]
    ulp = torch.ldexp(torch.ones_like(eb), (torch.frexp(e[bad].to(dt).double().abs().clamp_min(
        torch.finfo(dt).tiny)).exponent - MANT[str(dt)[6:]]).long())
    first = torch.nonzero(bad)[:4].tolist()
    return n, (f"{n}/{a.numel()} bad, max_abs={float(eb[torch.isfinite(eb)].max()) if torch.isfinite(eb).any() else float('inf'):.4g} "
               f"max_rel={float((eb / e[bad].abs().clamp_min(1e-300)).max()):.4g} max_ulp={float((eb / ulp).max()):.4g} "
               f"first={first} flipped_bits={bits} expected={e[bad][:4].tolist()} actual={a[bad][:4].tolist()}")


def fill(x, ins, device, dtype_map):
    """Rebuild an op's arguments: recorded tensors by index, dtypes, devices and floats by tag."""
    if isinstance(x, list):
        return [fill(v, ins, device, dtype_map) for v in x]
    if isinstance(x, dict):
        if "in" in x:
            return ins[x["in"]]
        if "dtype" in x:
            return dtype_map(getattr(torch, x["dtype"]))
        if "device" in x:
            return torch.device(device)
        if "float" in x:
            return float(x["float"])
    return x


__APPLY__

__TOLERANCE__

def apply_settings(settings):
    """The bit-changing settings this failure needs (the header lists the ones it does not)."""
    apply(settings)
    if settings:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))


def resolve(name):
    ns, rest = name.split(".", 1)
    packet, overload = rest.rsplit(".", 1)
    return getattr(getattr(getattr(torch.ops, ns), packet), overload)
'''

_COMMON = _COMMON.replace("__APPLY__", inspect.getsource(st.apply)).replace(  # one definition each, embedded
    "__LAYOUT__", inspect.getsource(fmt.laid_out)).replace(
    "__TOLERANCE__", "\n\n".join(inspect.getsource(f) for f in (tol.outside_tolerance, tol.absolute,
                                                                  tol.widened_scale)))


def _helpers(last: dict[str, Any]) -> str:
    """The tolerance and reference helpers the checked op needs, each embedded once: a cancelling op's
    terms bound (a norm's, softmax's or attention's backward), a fused GPU kernel's float64 stand-in
    (CUDA's flash, efficient and cuDNN attention, cuDNN batch norm), and the attention argument reader
    both use."""
    parts: list[Any] = []
    if last["widening"] == "terms" or last.get("fused"):
        parts += [AttentionArgs, attention_args]
    if last["widening"] == "terms":
        parts += [cancelling_terms, terms_of]
    if last.get("fused"):
        parts.append(fused_reference)
    return "from typing import Any, NamedTuple\n\n\n" + "\n\n".join(map(inspect.getsource, parts)) if parts else ""


_MULTI = r'''
CASE = json.loads(r"""__CASE__""")

__TERMS__


def run(op, inputs, device, dtype_map, fault):
    """One op on its own recorded inputs; the fault hook sees its `output`-th floating-point output."""
    func = resolve(op["op"])
    ins = [t.to(device) if device != "cpu" else t.clone() for t in inputs]
    out = func(*fill(op["args"], ins, device, dtype_map), **{k: fill(v, ins, device, dtype_map)
                                                             for k, v in op["kwargs"].items()})
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    floats = [t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if hit(fault, op["op"].split(".")[1]) and fault["output"] < len(floats):
        corrupt(floats[fault["output"]], fault)
    return outs


def main():
    p = argparse.ArgumentParser(description=CASE["title"])
    p.add_argument("--device", default=CASE["device"], help="where to run the ops (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=CASE.get("repeat", 1),
                   help="runs; exit 1 if any run reproduces (default: %(default)s, the trial plan)")
    p.add_argument("--inject", default="", help="simulation hook for testing reproducers (see the docstring)")
    a = p.parse_args()
    apply_settings(CASE.get("settings", {}))
    ops = CASE["ops"]
    up = lambda d: torch.float64 if d.is_floating_point else d  # noqa: E731
    same = lambda d: d  # noqa: E731
    with torch.no_grad():
        inputs = [[load(s, "cpu") for s in op["inputs"]] for op in ops]
        last = ops[-1]
        against = "float64 on the host"
        try:
            ref_dt, ref_in = up, [t.to(up(t.dtype)) for t in inputs[-1]]
            if last.get("fused"):  # a fused GPU kernel (attention, cuDNN batch norm): its float64 math
                against = "its math definition in float64 on the host"
                expected = fused_reference(last["op"].split(".")[1], fill(last["args"], ref_in, "cpu", ref_dt),
                                           {k: fill(v, ref_in, "cpu", ref_dt) for k, v in last["kwargs"].items()}
                                           )[last["output"]]
            else:
                expected = run(last, ref_in, "cpu", up, None)[last["output"]]
        except RuntimeError:  # no float64 kernel (grouped GEMMs): the same op in its own dtype on the host
            ref_dt, ref_in, against = same, [t.clone() for t in inputs[-1]], "the op in its own dtype on the host"
            expected = run(last, ref_in, "cpu", same, None)[last["output"]]
        # a sum that cancels keeps the rounding of its terms (the op on |inputs| scales it), as does a
        # norm's, softmax's or attention's backward (its centred terms)
        magnitude = widened_scale(last["widening"], last["op"].split(".")[1], resolve(last["op"]),
                                  fill(last["args"], ref_in, "cpu", ref_dt),
                                  {k: fill(v, ref_in, "cpu", ref_dt) for k, v in last["kwargs"].items()},
                                  last["output"])
        failed = 0
        for r in range(a.repeat):
            fault = parse_inject(a.inject)  # a fresh call counter per run: the sequence is the history
            for op, ins in zip(ops[:-1], inputs[:-1]):
                try:
                    run(op, ins, a.device, same, fault)
                except Exception:  # noqa: BLE001
                    pass
            out = run(last, inputs[-1], a.device, same, fault)[last["output"]]
            n, text = metric(out, expected, CASE["rtol"], magnitude)
            after = f" after {len(ops) - 1} ops" if len(ops) > 1 else ""
            print(f"run {r + 1}/{a.repeat} {last['op']}{after} on {a.device}: {text}")
            failed += n > 0
    print(f"{'REPRODUCED' if failed else 'not reproduced'}: {failed} of {a.repeat} runs wrong "
          f"(tolerance rtol={CASE['rtol']} x (|expected| + rms(expected)){' or the op on |inputs|' if last['widening'] == 'sums' else ' or its terms' if magnitude is not None else ''}"
          f" vs {against})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
'''

_COLLECTIVE = r'''
import os, socket
import torch.distributed as dist
import torch.multiprocessing as mp

CASE = json.loads(r"""__CASE__""")


__REDUCTION__

def rank_main(rank, world, port, device_kind, fault_spec, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = f"cuda:{rank}" if device_kind == "cuda" else "cpu"
    ins = [load(s, "cpu") for s in CASE["inputs"]]
    t = ins[rank].clone().to(device)
    corrupt(t, parse_inject(fault_spec), rank)  # the simulated bad link / NIC: the outgoing payload
    kind, red, src, splits = CASE["kind"], CASE["reduce_op"], CASE["source"], CASE.get("splits")
    op = getattr(dist.ReduceOp, red.upper()) if red else None
    if kind == "all_reduce":
        dist.all_reduce(t, op=op)
        out = t
    elif kind == "all_gather":
        out = torch.empty(world * t.numel(), dtype=t.dtype, device=device)
        dist.all_gather_into_tensor(out, t.reshape(-1))
    elif kind == "reduce_scatter":
        out = torch.empty(t.numel() // world, dtype=t.dtype, device=device)
        dist.reduce_scatter_tensor(out, t.reshape(-1), op=op)
    elif kind == "all_to_all" and splits:  # uneven: rank j sends splits[j][k] rows to rank k
        rows = [s[rank] for s in splits]
        out = torch.empty((sum(rows), *t.shape[1:]), dtype=t.dtype, device=device)
        dist.all_to_all_single(out, t, output_split_sizes=rows, input_split_sizes=splits[rank])
    elif kind == "all_to_all":
        out = torch.empty(t.numel(), dtype=t.dtype, device=device)
        dist.all_to_all_single(out, t.reshape(-1))
    elif kind == "send_recv":  # rank 0 sends what the sender sent, rank 1 receives it
        if rank == 0:
            dist.send(t, 1)
        else:
            dist.recv(t, 0)
        out = t
    else:
        dist.broadcast(t, src=src)
        out = t
    dist.barrier()
    expected, tol = exact_result(kind, red, [x.double() for x in ins], rank, src, 2.0 ** -MANT[CASE["dtype"]],
                                 splits)
    got = out.cpu().double().reshape(-1)
    err = (got - expected).abs()
    bad = ~((err <= tol) | (got == expected) | (torch.isnan(got) & torch.isnan(expected)))
    n = int(bad.sum())
    text = f"agrees with {CASE['exact']}" if n == 0 else metric(out.cpu().reshape(-1), expected, 0.0)[1]
    q.put((rank, n, text))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=CASE["title"])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    p.add_argument("--repeat", type=int, default=1, help="runs; exit 1 if any run reproduces")
    p.add_argument("--inject", default="", help="simulation hook for testing reproducers (see the docstring)")
    a = p.parse_args()
    world = CASE["world"]
    ctx = mp.get_context("spawn")
    failed = 0
    for r in range(a.repeat):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=rank_main, args=(k, world, port, a.device.split(":")[0], a.inject, q))
                 for k in range(world)]
        for pr in procs:
            pr.start()
        rows = sorted(q.get(timeout=120) for _ in procs)
        for pr in procs:
            pr.join(60)
        bad = 0
        for rank, n, text in rows:
            print(f"run {r + 1}/{a.repeat} rank {rank}/{world} {CASE['what']} on {a.device}: {text}")
            bad += n
        failed += bad > 0
    print(f"{'REPRODUCED' if failed else 'not reproduced'}: {failed} of {a.repeat} runs wrong "
          f"({CASE['what']} of {world} ranks vs {CASE['exact']}, computed on the host)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
'''


def _embed(t: Any) -> dict[str, Any]:
    raw = fmt.tensor_bytes(t)
    return {"kind": "data", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(raw).hexdigest(), "data": base64.b64encode(zlib.compress(raw, 9)).decode()}


def _header(title: str, lines: list[str]) -> str:
    body = "\n".join(lines)
    return (f'"""{title}\n\nGenerated by chipcheck (single-file reproducer; needs only torch and numpy).\n\n{body}\n\n'
            "Exit status: 1 when the bug reproduces, 0 when it does not.\n"
            "--inject SPEC is a simulation hook for testing reproducers on a healthy chip:\n"
            "bitflip:bit=B[,rank=R][,index=I][,op=NAME][,after=N][,count=N][,chance=P[,seed=S]] or nan[:...]\n"
            "(op=NAME: only calls of that aten op count; after=N: the first N are spared;\n"
            "chance=P: an intermittent fault).\n\"\"\"\n")


def with_evidence(text: str, evidence: Evidence) -> str:
    """The file with the verification's chip-against-chip evidence added to its header (a comment:
    what the file does is unchanged)."""
    mark = "\nExit status: 1 when the bug reproduces"
    return text.replace(mark, f"\nEvidence: {evidence.line()}\n{mark}", 1)


def _environment(settings: dict[str, Any] | None) -> str:
    """repro.py's first lines: the bit-changing environment variables the failure needs set and the
    others cleared, before torch loads (they are read then), so the vendor's shell cannot change the
    run; as it was verified."""
    env = st.env_of(settings or {})
    return ("\nimport os\n\n# bit-changing environment variables (read when torch and its libraries load): the ones this\n"
            "# failure needs, the others cleared\n"
            f"ENV = {json.dumps(env)}\n"
            f"for name in {json.dumps(sorted(st.ENV_VARS))}:\n"
            "    os.environ.pop(name, None)\nos.environ.update(ENV)\n")


def _kept_line(label: str, kept: dict[str, Any], recorded: dict[str, Any] | None) -> str:
    """"Settings: a=1 (not needed, dropped: b)": what a shrink kept of what was recorded."""
    said = ", ".join(f"{k}={v}" for k, v in sorted(kept.items())) or "none"
    dropped = sorted(set(recorded or {}) - set(kept))
    return f"{label}: {said}" + (f" (not needed, dropped: {', '.join(dropped)})" if dropped else "")


def _settings_lines(settings: dict[str, Any] | None, recorded: dict[str, Any] | None) -> list[str]:
    return [] if settings is None else [_kept_line("Settings", settings, recorded)]


def _env_lines(env: dict[str, str], recorded: dict[str, str] | None) -> list[str]:
    if recorded is None:  # not shrunk (the suspect group is elsewhere)
        return [f"Environment: {', '.join(f'{k}={v}' for k, v in sorted(env.items()))} (as recorded, not shrunk)"] \
            if env else []
    return [_kept_line("Environment", env, recorded)]


def _trial_lines(rate: Rate | None, device: str) -> list[str]:
    if rate is None or not rate.intermittent:
        return [f"Run: python repro.py --device {device} --repeat 10"]
    return [f"Trials: {rate.line()}", f"Run: python repro.py --device {device}   (--repeat {rate.plan} by default)"]


def render_op(case: OpCase, *, device: str, metric_line: str, where: list[str] | None = None,
              rate: Rate | None = None, settings: dict[str, Any] | None = None,
              recorded: dict[str, Any] | None = None) -> str:
    """repro.py for one op."""
    ins = _inputs(case)
    shapes = ", ".join(_described(i) for i in case.inputs)
    title = f"chipcheck reproducer: {case.op} on {device}"
    # one op is the history case with no history: one template serves both
    data = {"title": title, "ops": [{"op": case.op, "args": case.args, "kwargs": case.kwargs, "inputs": ins,
                                     "output": case.output, **_tolerance(case.op)}], "device": device,
            "rtol": _rtol(case),
            "repeat": rate.plan if rate else 1, "settings": settings or {}}
    head = _header(title, [f"Op: {case.op}({shapes})", f"Observed: {metric_line}",
                           *(f"Seen at: {w}" for w in (where or [])), *_settings_lines(settings, recorded),
                           *_trial_lines(rate, device)])
    return head + _environment(settings) + _multi(data)


def _tolerance(op: str) -> dict[str, Any]:
    """How the checked op's tolerance widens, as replay's does (`replay.widening`: "sums", "terms" or
    None), and whether it is a fused GPU kernel judged against its float64 stand-in."""
    from . import replay as rp

    name = op.split(".")[1]
    return {"widening": rp.widening(name), "fused": name in STANDS_IN}


def _multi(data: dict[str, Any]) -> str:
    last = data["ops"][-1]
    return _COMMON + _MULTI.replace("__CASE__", json.dumps(data)).replace("__TERMS__", _helpers(last))


def _inputs(case: OpCase) -> list[dict[str, Any]]:
    return [{**(_embed(i.data) if i.kind == "data" else
                {"kind": i.kind, "shape": list(i.shape), "dtype": i.dtype, "seed": i.seed}),
             **({"order": list(i.order)} if i.order else {})} for i in case.inputs]


def _rtol(case: OpCase) -> float:
    """The checked op's tolerance: `replay.rtol_for` of its inputs' dtypes (its output's is not known
    before repro.py runs it; verification runs the file on a healthy device)."""
    import torch

    from . import replay as rp

    return rp.rtol_for(getattr(torch, i.dtype) for i in case.inputs) or 1e-3


def _described(i: Any) -> str:
    """An input as the header names it: shape, dtype, what it holds, and a layout that is not row-major."""
    return f"{tuple(i.shape)} {i.dtype} ({i.kind}" + (f", dims in memory {i.order}" if i.order else "") + ")"


def render_ops(history: list[OpCase], case: OpCase, *, device: str, metric_line: str,
               where: list[str] | None = None, rate: Rate | None = None, settings: dict[str, Any] | None = None,
               recorded: dict[str, Any] | None = None) -> str:
    """repro.py for a failure that needs history: the earlier ops, each on its embedded recorded inputs,
    replayed in order, then `case`, whose output is compared with float64 on the host."""
    if not history:
        return render_op(case, device=device, metric_line=metric_line, where=where, rate=rate, settings=settings,
                         recorded=recorded)
    ops = [{"op": c.op, "args": c.args, "kwargs": c.kwargs, "inputs": _inputs(c), "output": c.output}
           for c in [*history, case]]
    ops[-1].update(_tolerance(case.op))  # only the checked op's tolerance is read
    title = f"chipcheck reproducer: {case.op} on {device} after {len(history)} earlier ops"
    data = {"title": title, "ops": ops, "device": device, "rtol": _rtol(case),
            "repeat": rate.plan if rate else 1, "settings": settings or {}}
    seq = [f"  {k + 1}. {c.op}(" + ", ".join(f"{tuple(i.shape)} {i.dtype}" for i in c.inputs) + ")"
           for k, c in enumerate([*history, case])]
    head = _header(title, ["The failure needs history: the last op is wrong only after the ones before it",
                           "(each op runs on its own recorded inputs; only the last op's output is checked).",
                           *seq, f"Observed: {metric_line}", *(f"Seen at: {w}" for w in (where or [])),
                           *_settings_lines(settings, recorded), *_trial_lines(rate, device)])
    return head + _environment(settings) + _multi(data)


def render_collective(case: CollectiveCase, *, metric_line: str) -> str:
    """repro.py for a collective (all-reduce, all-gather, reduce-scatter, broadcast, all-to-all, a send
    and its receive): spawns the group's ranks, each sending its embedded recorded input, and checks
    every rank's result against the exact one computed on the host."""
    t0 = case.inputs[0]
    div = case.divergence
    kind = div.collective or "all_reduce"
    red = div.reduce_op or ("sum" if kind == "all_reduce" else "")
    what = f"{kind} ({red})" if red else {"broadcast": f"broadcast from rank {div.source}",
                                          "send_recv": "send from rank 0, recv on rank 1"}.get(kind, kind)
    if div.splits:
        what += f" (uneven: sizes sent per rank {div.splits})"
    exact = f"the exact {red} of every rank's input" if red else "what the ranks sent, bit for bit"
    title = f"chipcheck reproducer: {what} over {case.world} ranks"
    data = {"title": title, "world": case.world, "dtype": str(t0.dtype).removeprefix("torch."),
            "inputs": [_embed(t) for t in case.inputs], "kind": kind, "reduce_op": red, "source": div.source,
            "what": what, "exact": exact, "splits": div.splits}
    head = _header(title, [f"Op: {case.op} ({what}), {case.world} ranks, input {tuple(t0.shape)} {data['dtype']}",
                           f"Observed on rank {div.rank}: {metric_line}",
                           *_env_lines(case.env, case.recorded_env),
                           "Run: python repro.py --device cpu   (gloo; --device cuda uses NCCL, one GPU per rank)"])
    env = {st.ENV + k: v for k, v in case.env.items()}
    return head + _environment(env) + _COMMON + _COLLECTIVE.replace("__CASE__", json.dumps(data)).replace(
        "__REDUCTION__", inspect.getsource(reduction) + "\n\n" + inspect.getsource(exact_result))
