"""`chipcheck repro replay|shrink|bundle`: reproducers from captured steps (docs/reproducers.md)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from ..options import (
    check_writable,
    fail,
)


@click.group()
def repro() -> None:
    """Capture replay, shrinking to one file, and vendor bundles (docs/reproducers.md)."""


def _repro_call(fn: Any) -> Any:
    """Run a reproducers call; a bad capture or a case that no longer fails is one line, exit 2."""
    from ..reproducers import format as rfmt
    from ..reproducers.replay import ReplayError
    from ..reproducers.shrink import NotReproducible

    try:
        return fn()
    except (rfmt.CaptureError, ReplayError, NotReproducible) as e:
        fail(str(e))
    except ValueError as e:  # a malformed --inject spec
        fail(str(e))
    except OSError as e:  # a file it reads or writes (a bundle on a full disk)
        fail(f"{e.filename}: {e.strerror or e}" if e.filename else str(e))


_REFERENCE = click.option("--reference", default="cpu64", show_default=True,
                          help="cpu64 (float64 on the CPU), a device (cpu, cuda:1) or rank:N.")
_INJECT = click.option("--inject", default=None,
                       help="Simulation hook: a probes/faults/ spec applied to the suspect's kernels.")


@repro.command("replay")
@click.argument("capture_dir", metavar="CAPTURE")
@_REFERENCE
@click.option("--device", default=None, help="Suspect device [default: where the capture ran].")
@click.option("--rank", type=int, default=None, help="Which rank's capture [default: the lowest].")
@_INJECT
def repro_replay(capture_dir: str, reference: str, device: str | None, rank: int | None, inject: str | None) -> None:
    """Replay op by op; name the first op that differs from the reference. Exit 1 when one does."""
    from ..reproducers import format as rfmt
    from ..reproducers import replay as rp

    cap = _repro_call(lambda: rfmt.load(capture_dir, rank))
    res = _repro_call(lambda: rp.replay(cap, device=device, reference=reference, inject=inject))
    if unchecked := rp.unchecked_note(cap):
        click.echo(f"note: {unchecked}")
    if res.capture_mismatch is not None:
        click.echo(f"note: replay differs from the captured bits first at op #{res.capture_mismatch}")
    if res.not_compared:
        click.echo(f"note: {len(res.not_compared)} op(s) replayed but not compared: "
                   f"{'; '.join(res.not_compared[:3])}{'; ...' if len(res.not_compared) > 3 else ''}")
    if res.stand_in:
        click.echo(f"note: {len(res.stand_in)} fused GPU op(s) the reference cannot run compared with "
                   f"their math definition in float64: {'; '.join(res.stand_in[:3])}"
                   f"{'; ...' if len(res.stand_in) > 3 else ''}")
    if res.native:
        click.echo(f"note: {len(res.native)} op(s) with no float64 kernel compared with the same op in their own "
                   f"dtype on the reference device: {'; '.join(res.native[:3])}{'; ...' if len(res.native) > 3 else ''}")
    d = res.divergence
    if d is None:
        click.echo(f"rank {res.rank}: {res.ops} ops replayed; every op agrees with {reference}")
        sys.exit(0)
    click.echo(f"rank {d.rank}: first divergent op #{d.index} {d.op} output {d.output} on {d.device} "
               f"vs {d.reference}: {d.metric.line()}")
    for frame in d.stack:
        click.echo(f"  at {frame}")
    sys.exit(1)


@repro.command("shrink")
@click.argument("capture_dir", metavar="CAPTURE")
@_REFERENCE
@click.option("--device", default=None, help="Suspect device [default: where the capture ran].")
@click.option("--rank", type=int, default=None, help="Which rank's capture [default: the lowest].")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="k-of-n: runs per candidate (more for an intermittent failure: its trial plan).")
@click.option("--passes", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Whole-step replays tried until one diverges (an intermittent chip computes some right).")
@click.option("--collective", is_flag=True, help="Shrink a collective failure over every rank's capture.")
@_INJECT
@click.option("--live-inject", is_flag=True,
              help="Count the --inject fault's matching calls as each candidate runs (a chip whose fault depends "
                   "on what ran before), not per original op: simulates a failure that needs history.")
@click.option("-o", "--output", default="repro.py", show_default=True, help="The single-file reproducer.")
def repro_shrink(capture_dir: str, reference: str, device: str | None, rank: int | None, repeat: int,
                 passes: int, collective: bool, inject: str | None, live_inject: bool, output: str) -> None:
    """Shrink a failing capture to one file, repro.py (exit 2 when nothing fails).

    When the divergent op does not fail alone, the failure needs history: suffix bisection then ddmin over
    the earlier ops (each on its recorded inputs) keep the few it needs, and repro.py replays them in order."""
    from ..reproducers import emit
    from ..reproducers import settings as st
    from ..reproducers import shrink as sk
    from ..reproducers import verify as vf

    _check_output(output, "-o")  # before the shrink, not after it
    if collective:
        case = _repro_call(lambda: sk.shrink_collective(capture_dir, device=device))
        click.echo(f"{case.op}: {case.world} ranks; {case.divergence.metric.line()}")
        hook = _repro_call(lambda: vf.collective_hook(inject, case.divergence.members))

        def render_group(settings: dict[str, Any]) -> str:
            shrunk = dataclasses.replace(case, env=st.env_of(settings), recorded_env=case.env)
            return emit.render_collective(shrunk, metric_line=case.divergence.metric.line())

        if hook:  # the simulated bad link shows here: each recorded variable is tried without
            recorded = {st.ENV + k: v for k, v in case.env.items()}
            kept, env_runs = vf.shrink_env(render_group, recorded, suspect="cpu", hook=hook)
            _say_env(env_runs, recorded, kept)
            text = render_group(kept)
        else:  # the suspect group is elsewhere: the file keeps the environment as recorded
            text = emit.render_collective(case, metric_line=case.divergence.metric.line())
        check = vf.verify(text, suspect="cpu", reference="cpu", hook=hook, collective=True)
    else:
        r = _repro_call(lambda: sk.shrink_capture(capture_dir, reference=reference, device=device, rank=rank,
                                                  inject=inject, repeats=repeat, live_inject=live_inject,
                                                  passes=passes))
        shapes = ", ".join(f"{i.shape} {i.kind}" for i in r.case.inputs)
        after = f" after {len(r.history)} earlier ops ({', '.join(c.op for c in r.history)})" if r.history else ""
        click.echo(f"op #{r.divergence.index} {r.case.op}({shapes}){after}: {r.metric.line()} "
                   f"[{r.tries} candidates, {r.seconds:.1f} s]")
        if r.rate is not None:
            click.echo(r.rate.line())
        hook = _repro_call(lambda: vf.hook_spec(inject, r.divergence.rank, op=r.case.op, history=bool(r.history),
                                                live=live_inject))
        ref_dev = _repro_call(lambda: vf.reference_device(reference, capture_dir))

        def render(settings: dict[str, Any]) -> str:
            return emit.render_ops(r.history, r.case, device=r.divergence.device, metric_line=r.metric.line(),
                                   where=r.stack, rate=r.rate, settings=settings, recorded=r.recorded)

        # as many runs as the vendor's default (the trial plan), and never fewer than 10: the evidence
        # chip against chip is then worth a p-value
        plan = max(10, r.rate.plan if r.rate else 1)
        settings, env_runs = vf.shrink_env(render, r.settings, suspect=r.divergence.device, hook=hook, repeat=plan)
        _say_env(env_runs, r.settings, settings)
        text = render(settings)
        check = vf.verify(text, suspect=r.divergence.device, reference=ref_dev, hook=hook, repeat=plan)
    if not check.ok:  # a repro never lies: run as the vendor would, before it is written
        fail(f"{output} not written: {check.line()}")
    click.echo(check.line())
    if check.evidence is not None:
        text = emit.with_evidence(text, check.evidence)
    try:
        Path(output).write_text(text)
    except OSError as e:
        fail(f"-o {output}: cannot be written ({e.strerror or e})")
    click.echo(f"wrote {output} ({len(text)} bytes)")


def _say_env(runs: list[tuple[str, Any]], recorded: dict[str, Any], kept: dict[str, Any]) -> None:
    """One line per environment variable tried (verify.shrink_env): dropped or kept, and the run that said so."""
    from ..reproducers import settings as st

    for k, run in runs:
        click.echo(f"{k.removeprefix(st.ENV)}={recorded[k]}: "
                   + ("not needed, dropped (the file still fails without it)" if k not in kept
                      else "needed, kept (the file passes without it)")
                   + f": {run.line()}")


@repro.command("bundle")
@click.argument("source", metavar="CAPTURE-or-repro.py")
@click.option("--repro", "repro_path", default=None, help="With a CAPTURE: its repro.py.")
@click.option("--redact", is_flag=True, help="Strip module names, file paths and stack frames.")
@click.option("--db", "db_path", default=None, help="Results store for the chip's chipcheck history.")
@click.option("-o", "--output", default="bundle.tar.gz", show_default=True)
def repro_bundle(source: str, repro_path: str | None, redact: bool, db_path: str | None, output: str) -> None:
    """Pack repro.py, env.json, history, input hashes and a README for the vendor."""
    from ..reproducers import bundle

    if not Path(source).exists():
        fail(f"{source}: no such capture directory or repro.py")
    _check_output(output, "-o")
    text = None
    if repro_path:
        try:
            text = Path(repro_path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--repro {repro_path}: cannot be read ({getattr(e, 'strerror', None) or e})")
    out = _repro_call(lambda: bundle.make(source, output, repro=text, redact=redact, db=db_path))
    click.echo(f"wrote {out}")


def _check_output(path: str, flag: str) -> None:
    """An output file that cannot be written is one line and exit 2, before any work."""
    from ..fleet.runner import UsageError

    try:
        check_writable(Path(path), flag)
    except UsageError as e:
        fail(str(e))
