"""`chipcheck report` (any stored run) and `chipcheck export prometheus`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..options import (
    check_writable,
    fail,
    parse_reports,
)
from ..reports.formats import FORMATS
from .common import write_output


@click.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID|latest]...")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="text (the terminal table), json (chipcheck.run/1), junit (XML for CI), html (self-contained), "
                   "ocp (OCP Test & Validation JSON lines), prom (Prometheus textfile).")
@click.option("-o", "--output", default="-", show_default=True, help="File to write ('-' for stdout).")
@click.option("--report", "reports", multiple=True, metavar="FORMAT=FILE",
              help="Also write the run as FORMAT to FILE, e.g. --report ocp=run.jsonl --report prom=run.prom "
                   "(repeatable).")
def report(run_ids: tuple[str, ...], db_path: str | None, fmt: str, output: str, reports: tuple[str, ...]) -> None:
    """Render a stored run (default: the latest) as text, JSON, JUnit XML, HTML, OCP or Prometheus text.

    Several run ids make one report of them side by side (e.g. the torch run of the GPU hosts and
    the JAX run of the TPU hosts), each judged as it was. Exits like `chipcheck run`: 0 when every
    device passed, 1 when any failed, 2 for a bad run id or store.
    """
    from ..fleet import history, reload
    from ..fleet.runner import UsageError
    from ..fleet.store import StoreError, default_path
    from ..reports import formats

    try:
        if output != "-":
            check_writable(Path(output), "-o")
        outputs = parse_reports(reports)
        store = reload.open_existing(db_path or default_path())
        try:
            summary = reload.load_many(store, list(run_ids) or [reload.LATEST])
            wanted = {fmt} | {f for f, _ in outputs}
            extras = history.report_extras(store, summary) if wanted & formats.NEEDS_EXTRAS else None
        finally:
            store.close()
    except (UsageError, StoreError, reload.RunNotFound) as e:
        fail(str(e))
    text = formats.render(summary, fmt, extras)
    if output == "-":
        click.echo(text, nl=False)
    else:
        write_output(Path(output), text, "-o")
    for f, dest in outputs:
        extra_text = formats.render(summary, f, extras)
        if dest == "-":
            click.echo(extra_text, nl=False)
        else:
            write_output(Path(dest), extra_text, "--report")
    sys.exit(0 if summary.verdict.value == "pass" and summary.status.value == "complete" else 1)


@click.group()
def export() -> None:
    """Write a stored run for the systems a fleet already runs (docs/integrations.md)."""


@export.command("prometheus")
@click.option("--run", "run_id", default="latest", show_default=True, help="The run to export (an id or prefix).")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
@click.option("-o", "--output", required=True,
              help="The .prom file, e.g. /var/lib/node_exporter/textfile/chipcheck.prom ('-' for stdout); "
                   "written through a rename, so node_exporter never reads half a file.")
def export_prometheus(run_id: str, db_path: str | None, output: str) -> None:
    """Per-device verdicts, failure codes, throughput and days since the last pass as node_exporter
    textfile metrics. Exits 0 once written, whatever the run's verdict (alerting is Prometheus's job);
    2 for a bad run id, store or output path."""
    from ..fleet import history, reload
    from ..fleet.runner import UsageError
    from ..fleet.store import StoreError, default_path
    from ..reports import formats

    try:
        if output != "-":
            check_writable(Path(output), "-o")
        store = reload.open_existing(db_path or default_path())
        try:
            summary = reload.load(store, run_id)
            extras = history.report_extras(store, summary)
        finally:
            store.close()
    except (UsageError, StoreError, reload.RunNotFound) as e:
        fail(str(e))
    text = formats.render(summary, "prom", extras)
    if output == "-":
        click.echo(text, nl=False)
    else:
        write_output(Path(output), text, "-o")
        click.echo(f"wrote {output} (run {summary.run_id}, {len(summary.devices)} devices)", err=True)


