"""`python -m chipcheck.worker run|links ...`: the command line of one rank under torchrun, srun or a
Kubernetes Indexed Job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment).

It takes the options of `chipcheck run` / `chipcheck links` (chipcheck.options) and hands them to
fleet.distributed, which runs this rank; rank 0 gathers the results and writes the store, --json
and the reports. It builds on the shared options and never imports the cli package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .options import common_options, fail, link_extra, links_options, parse_reports, run_options

if TYPE_CHECKING:
    from .fleet.runner import RunOptions
    from .results import RunSummary


@click.group()
def distributed_cli() -> None:
    """`python -m chipcheck.worker run|links ...`: one process per device under torchrun, srun or a
    Kubernetes Indexed Job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment);
    rank 0 gathers the results and writes the store, --json and the reports."""


def _distributed_options(fn: Any) -> Any:
    fn = click.option("--local-dir", default="chipcheck-shards", show_default=True,
                      help="Where each rank keeps a JSONL copy of its own results.")(fn)
    return click.option("--host-label", default=None,
                        help="This process's host name in reports [default: $CHIPCHECK_HOSTNAME or hostname].")(fn)


@distributed_cli.command("run")
@click.option("--probes", default="", help="Comma-separated probes to run [default: every probe the devices allow].")
@_distributed_options
@common_options
def distributed_run(probes: str, local_dir: str, host_label: str | None, **kw: Any) -> None:
    """This rank's part of `chipcheck run`."""
    names = tuple(p.strip() for p in probes.split(",") if p.strip())
    _execute_distributed(lambda: run_options(kw, names, {}), kw, "run", local_dir, host_label)


@distributed_cli.command("links")
@links_options
@_distributed_options
@common_options
def distributed_links(pairing: str, declared: str | None, local_dir: str, host_label: str | None, **kw: Any) -> None:
    """This rank's part of `chipcheck links`."""
    _execute_distributed(lambda: run_options(kw, ("links",), link_extra(pairing, declared)), kw, "links", local_dir,
                         host_label)


def _execute_distributed(make_opts: Callable[[], RunOptions], kw: dict[str, Any], command: str, local_dir: str,
                         host_label: str | None) -> None:
    from .fleet import distributed, runner
    from .fleet.store import StoreError

    try:
        opts = make_opts()
        runner.validate(opts)
        if opts.options.get("declared"):
            runner.load_declared(opts.options["declared"])
        outputs = parse_reports(kw["reports"])
        dopts = distributed.DistributedOptions(command=command, db_path=kw["db_path"], local_dir=local_dir,
                                               host=host_label, show=_shower(kw["json_path"], outputs))
        code = distributed.run(opts, dopts)
    except (runner.UsageError, StoreError, click.BadParameter) as e:
        fail(str(e.format_message() if isinstance(e, click.BadParameter) else e))
    except KeyboardInterrupt:  # SIGINT/SIGTERM/SIGHUP: rank 0 stored the run as interrupted
        click.echo(f"chipcheck: rank {os.environ.get('RANK', '?')} interrupted; results so far are in its shard "
                   f"under {local_dir} (rank 0: and in the store)", err=True)
        sys.exit(130)
    sys.exit(code)


def _shower(json_path: str | None, outputs: list[tuple[str, str]]) -> Callable[[RunSummary], None]:
    """Rank 0's output of the judged run: the terminal table, --json, and every --report FORMAT=FILE."""

    def show(summary: RunSummary) -> None:
        from .reports import formats, json_report, terminal

        print(terminal.render(summary), flush=True)
        if json_path:
            text = json_report.render(summary)
            if json_path == "-":
                print(text)
            else:
                Path(json_path).write_text(text + "\n")
        for fmt, dest in outputs:
            out = formats.render(summary, fmt)
            if dest == "-":
                print(out, end="")
            else:
                Path(dest).write_text(out)

    return show


def main(argv: list[str]) -> int:
    """`python -m chipcheck.worker run|links ...` (the options of `chipcheck run` / `chipcheck links`)."""
    distributed_cli.main(args=argv, prog_name="python -m chipcheck.worker")
    return 0
