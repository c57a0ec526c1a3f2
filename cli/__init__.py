"""The `chipcheck` command: a thin layer that parses, calls the library, prints, and maps exit codes.

Exit codes: 0 every device passed, 1 some device failed, 2 usage or setup error.
torch is imported only by the commands that need it (and by the workers). One module per command
group: run.py (list, run, links), report.py (report, export), sweep.py, fleet.py (ingest, history,
quarantine), repro.py; common.py what several share.
"""

from __future__ import annotations

import click

from .. import __version__
from ..reports.formats import FORMATS
from . import fleet, report, repro, run, sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chipcheck")
def main() -> None:
    """Prove every accelerator computes the right bits at the right speed."""


for _cmd in (run.list_cmd, run.run, run.links, report.report, report.export, sweep.sweep, fleet.ingest,
             fleet.history, fleet.quarantine, repro.repro):
    main.add_command(_cmd)

__all__ = ["FORMATS", "main"]
