"""The command-line options `chipcheck run`, `chipcheck links`, `chipcheck sweep` and the torchrun entry point
(`python -m chipcheck.worker run|links`, chipcheck.torchrun) share, and their conversion into a
fleet.runner.RunOptions. Both command lines build on this module; neither imports the other.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .reports.formats import FORMATS

if TYPE_CHECKING:
    from .fleet.runner import RunOptions

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def fail(msg: str) -> NoReturn:
    """A usage or setup error: one line on stderr, exit 2."""
    click.echo(f"chipcheck: error: {msg}", err=True)
    sys.exit(2)


def parse_duration(text: str) -> float:
    """`90s`, `10m`, `2h`, `1d` (or plain seconds) -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration; use e.g. 90s, 10m, 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def common_options(fn: Any) -> Any:
    """The options `run`, `links` and the distributed worker (`python -m chipcheck.worker`) share."""
    opts = [
        click.option("--devices", default="auto", show_default=True,
                     help="auto (every GPU, else CPU workers), cpu:N, cuda:0,3"),
        click.option("--profile", default="quick", show_default=True,
                     help="Time budget per device: quick (seconds), standard (~2 min), nightly (~15 min), "
                          "burnin (--duration)."),
        click.option("--duration", default=None, help=("Total time for --profile burnin, e.g. 10m or 2h. Under other profiles each case gets its "
                                "share as a time budget: burn runs for it, matmul and attention repeat in it "
                                "up to the profile's max_repeats.")),
        click.option("--seed", default=0, show_default=True, type=int, help="Base seed of every generated input."),
        click.option("--inject", multiple=True, metavar="SPEC",
                     help="Inject a fault, e.g. bitflip:rank=2,bit=20,rate=0.01 | slow:rank=1,factor=1.3 | "
                          "nan:rank=0 | hang:rank=3 | crash:rank=1 (repeatable)."),
        click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
                     help="SQLite results store [default: ~/.local/state/chipcheck/results.db]."),
        click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
                     help="Write the run as JSON (schema chipcheck.run/1) to this file ('-' for stdout)."),
        click.option("--report", "reports", multiple=True, metavar="FORMAT=FILE",
                     help=f"Also write the run as FORMAT ({'|'.join(FORMATS)}) to FILE ('-' for stdout), e.g. "
                          "--report html=run.html --report junit=run.xml (repeatable)."),
        click.option("--timeout", default=None, type=float,
                     help="Watchdog per probe case, seconds [default by profile]."),
        click.option("--min-gap", default=0.10, show_default=True, type=float,
                     help="Throughput shortfall vs fingerprint peers that counts as slow (0.1 = 10%)."),
        click.option("--baselines", default=None, type=click.Path(dir_okay=False),
                     help="TOML file of per-SKU achievable speeds over the shipped table (docs/baselines.md)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress lines."),
        click.option("-v", "--verbose", is_flag=True,
                     help="Stream every case as it ends, and print every device in full (the default when "
                          "output is not a terminal: CI logs, Slurm output files)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def links_options(fn: Any) -> Any:
    """The options `links` and the torchrun entry point's `links` add."""
    fn = click.option("--declared", default=None, type=click.Path(dir_okay=False),
                      help="TOML file declaring the topology: [ranks] 0 = [\"rack1\", \"node1\"] ...; the "
                           "measured grouping is checked against it.")(fn)
    return click.option("--pairing", default="auto", show_default=True,
                        help="all | random:K | auto (all pairs up to 64 endpoints, random:15 above); intra-host "
                             "pairs are always all-pairs.")(fn)


def run_options(kw: dict[str, Any], probes: tuple[str, ...], extra: dict[str, str]) -> RunOptions:
    """The parsed `common_options` (`kw`), the probes and probe options as a fleet.runner.RunOptions."""
    from .fleet import runner

    return runner.RunOptions(
        devices=kw["devices"], probes=probes, profile=kw["profile"], seed=kw["seed"], inject=kw["inject"],
        timeout_s=kw["timeout"], duration_s=parse_duration(kw["duration"]) if kw["duration"] else 0.0,
        min_gap=kw["min_gap"], options=extra, baselines=kw.get("baselines") or "", argv=sys.argv,
    )


def link_extra(pairing: str, declared: str | None) -> dict[str, str]:
    """`--pairing` / `--declared` as the links probe's options (a bad pairing is a UsageError)."""
    from .fleet.runner import UsageError
    from .probes import pairing as pairing_mod

    try:
        pairing_mod.parse_pairing(pairing)
    except pairing_mod.PairingSpecError as e:
        raise UsageError(str(e)) from None
    extra = {"pairing": pairing}
    if declared:
        extra["declared"] = declared
    return extra


def parse_reports(specs: tuple[str, ...]) -> list[tuple[str, str]]:
    """`--report FORMAT=FILE` values -> (format, file), checked before anything runs."""
    from .fleet.runner import UsageError

    out = []
    for spec in specs:
        fmt, sep, dest = spec.partition("=")
        fmt = fmt.strip().lower()
        if not sep or not dest or fmt not in FORMATS:
            raise UsageError(f"--report {spec!r}: expected FORMAT=FILE with FORMAT one of {', '.join(FORMATS)}, "
                             f"e.g. --report html=run.html")
        if dest != "-":
            check_writable(Path(dest), "--report")
        out.append((fmt, dest))
    return out


def check_writable(p: Path, flag: str = "--json") -> None:
    """A UsageError naming `flag` unless `p` can be written: tried, not asked (access(2) answers yes to root
    for /proc and the like, and an output that fails only once the run has measured everything is too
    late to refuse)."""
    import tempfile

    from .fleet.runner import UsageError

    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: directory {parent} does not exist")
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; name a file")
    if p.exists() and not p.is_file():  # a device or a pipe (/dev/stdout): written in place, not opened here
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {p} is not writable")
        return
    try:
        if p.exists():
            with open(p, "ab"):  # opened for writing, nothing written
                pass
        # outputs are written through a temporary file beside them and a rename (write_atomic)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".check", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{flag} {p} is not writable ({e.strerror or e})") from None
