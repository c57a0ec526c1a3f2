"""`chipcheck ingest`, `history` and `quarantine`: the fleet's store over time."""

from __future__ import annotations

import json
import sys

import click

from ..options import (
    fail,
)
from .common import news_lines


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
def ingest(paths: tuple[str, ...], db_path: str | None) -> None:
    """Merge JSONL result shards (files, or folders of them) into the store; ingesting twice adds nothing."""
    from ..fleet import ingest as ingestmod
    from ..fleet.store import Store, StoreError, default_path

    try:
        store = Store(db_path or default_path())
        try:
            rep = ingestmod.ingest(store, list(paths))
        finally:
            store.close()
    except (ingestmod.IngestError, StoreError) as e:
        fail(str(e))
    for w in rep.warnings:
        click.echo(f"chipcheck: warning: {w}", err=True)
    if rep.unshown > 0:
        click.echo(f"chipcheck: warning: {rep.unshown} more bad lines or files", err=True)
    click.echo(f"ingested {rep.added} results from {rep.shards} shards ({rep.duplicates} already stored"
               f"{f', {rep.bad_lines} unreadable lines' if rep.bad_lines else ''}"
               f"{f', {rep.bad_files} unreadable files skipped' if rep.bad_files else ''}); runs judged: "
               f"{', '.join(rep.runs) or 'none'}")
    if rep.added == rep.duplicates == 0 and (rep.bad_lines or rep.bad_files):  # a wrong path, not a torn shard
        fail(f"nothing in {', '.join(paths)} is a chipcheck result (the JSONL shards a torchrun or Slurm sweep "
             f"writes, or a run's unsaved file)")


@click.command()
@click.argument("key", required=False, metavar="[DEVICE-UUID|HOST]")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
@click.option("--min-drop", default=0.10, show_default=True, type=float,
              help="Fall in throughput against a device's own history that counts as a trend (0.1 = 10%).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def history(key: str | None, db_path: str | None, min_drop: float, as_json: bool) -> None:
    """Verdicts and throughput of a device (or a host's devices) over runs; without one, the fleet's trends."""
    from dataclasses import asdict

    from ..fleet import history as hist
    from ..fleet import reload, trends
    from ..fleet.store import StoreError, default_path

    if not 0.0 < min_drop < 1.0:
        fail("--min-drop must be between 0 and 1 (e.g. 0.1 for 10%)")
    try:
        store = reload.open_existing(db_path or default_path())
        try:
            rows = hist.device_history(store, key) if key else None
            rep = None if key else hist.report(store, trends.TrendPolicy(min_drop=min_drop))
        finally:
            store.close()
    except StoreError as e:
        fail(str(e))
    if rows is not None:
        if not rows:
            fail(f"no device with UUID or host {key!r} in {db_path or default_path()}")
        if as_json:
            click.echo(json.dumps([{**asdict(r), "verdict": r.verdict.value} for r in rows], indent=2))
            return
        import time as _time

        click.echo(f"{'run':<24} {'started':<17} {'host':<12} {'device':<8} {'verdict':<7} speed vs peers")
        for r in rows:
            speed = f"{r.speed_ratio:.3f}x" if r.speed_ratio is not None else "-"
            click.echo(f"{r.run_id:<24} {_time.strftime('%Y-%m-%d %H:%M', _time.localtime(r.started)):<17} "
                       f"{r.host:<12} {r.device:<8} {r.verdict.value:<7} {speed}")
        return
    assert rep is not None
    if as_json:
        click.echo(json.dumps({"runs": rep.runs, "latest": rep.latest,
                               "new_failures": [{**asdict(n), "verdict": n.verdict.value,
                                                 "before": n.before.value if n.before else None}
                                                for n in rep.new_failures],
                               "findings": [{**asdict(f), "code": f.code.to_dict()} for f in rep.findings]},
                              indent=2))
        return
    for line in news_lines(rep):
        click.echo(line)
    click.echo("Trends:" if rep.findings else "Trends: none")
    for f in rep.findings:
        click.echo(f"  {f.code.code} {f.code.severity.label:<8} {f.code.action.value:<12} {', '.join(f.hosts)} "
                   f"{f.device} {f.subject}: {f.detail}{' [new]' if f.new else ''}")


@click.command()
@click.option("--format", "fmt", type=click.Choice(["slurm", "k8s", "hosts"]), required=True,
              help="slurm: scontrol drain; k8s: kubectl cordon + taint; hosts: host, codes, action, reason.")
@click.option("--run", "run_id", default="latest", show_default=True, help="The run whose failures count.")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
@click.option("--no-history", is_flag=True, help="Only the run's failures, not the history's (lemons, trends).")
@click.option("--apply", "do_apply", is_flag=True, help="Run the commands (never done without this flag).")
def quarantine(fmt: str, run_id: str, db_path: str | None, no_history: bool, do_apply: bool) -> None:
    """Print the commands that take failing hosts out of service, with the reason per host.

    Exits 0 when no host needs to go, 1 when some do (or are listed), 2 for bad input, a failed --apply
    or a host name that may not reach the command (refused; the other hosts are still handled).
    """
    from ..fleet import history as hist
    from ..fleet import quarantine as q
    from ..fleet import reload
    from ..fleet.store import StoreError, default_path

    try:
        store = reload.open_existing(db_path or default_path())
        try:
            summary = reload.load(store, run_id)
            trend = None if no_history else hist.report(store, upto=summary.run_id)
        finally:
            store.close()
    except (StoreError, reload.RunNotFound) as e:
        fail(str(e))
    plans = q.collect(summary, trend)
    cmds, notes = q.commands(plans, q.Format(fmt), summary.run_id)
    for line in notes:
        click.echo(line)
    for c in cmds:
        click.echo(c.display)
    if do_apply:
        failed = [a for a in q.apply(cmds) if a.returncode != 0]
        for a in failed:
            click.echo(f"chipcheck: error: {a.command.display}: exit {a.returncode}: {a.output}", err=True)
        if failed:
            sys.exit(2)
    bad = q.refused(plans, q.Format(fmt))
    if bad:  # the others are drained (or listed); these need a person: bad input, not a verdict
        fail(f"{len(bad)} host name(s) in run {summary.run_id} refused for --format {fmt} (see '# refused' above); "
             f"the other hosts were {'drained' if do_apply else 'listed'}")
    sys.exit(1 if plans else 0)


