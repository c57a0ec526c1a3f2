"""The `chipcheck` command: a thin layer that parses, calls the library, prints, and maps exit codes.

Exit codes: 0 every device passed, 1 some device failed, 2 usage or setup error.
torch is imported only by the commands that need it (and by the workers).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .reports.formats import FORMATS

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def _fail(msg: str) -> NoReturn:
    click.echo(f"chipcheck: error: {msg}", err=True)
    sys.exit(2)


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration; use e.g. 90s, 10m, 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chipcheck")
def main() -> None:
    """Prove every accelerator computes the right bits at the right speed."""


@main.command("list")
@click.option("--devices", default="auto", show_default=True, help="auto, cpu:N or cuda:0,3")
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
def list_cmd(devices: str, as_json: bool) -> None:
    """List the devices found on this host, with their fingerprints."""
    from .fleet import devices as devmod

    try:
        devs = devmod.discover(devices)
    except devmod.DeviceSpecError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in devs], indent=2))
        return
    for d in devs:
        click.echo(f"{d.index:>3}  {d.label:<8} {d.name:<40} {d.memory_bytes / 2**30:8.1f} GiB  {d.uuid}  "
                   f"host={d.host}  fingerprint={d.fingerprint}")
        click.echo("       " + " ".join(f"{k}={v}" for k, v in sorted(d.fingerprint_fields.items())))


@main.command()
@click.option("--devices", default="auto", show_default=True, help="auto (every GPU, else CPU workers), cpu:N, cuda:0,3")
@click.option("--probes", default="", help="Comma-separated probes to run [default: every probe the devices allow].")
@click.option("--profile", default="quick", show_default=True,
              help="Time budget per device: quick (seconds), standard (~2 min), nightly (~15 min), burnin (--duration).")
@click.option("--duration", default=None, help="Total time for --profile burnin, e.g. 10m or 2h.")
@click.option("--seed", default=0, show_default=True, type=int, help="Base seed of every generated input.")
@click.option("--inject", multiple=True, metavar="SPEC",
              help="Inject a fault, e.g. bitflip:rank=2,bit=20,rate=0.01 | slow:rank=1,factor=1.3 | nan:rank=0 | "
                   "hang:rank=3 | crash:rank=1 (repeatable).")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the run as JSON (schema chipcheck.run/1) to this file ('-' for stdout).")
@click.option("--report", "reports", multiple=True, metavar="FORMAT=FILE",
              help=f"Also write the run as FORMAT ({'|'.join(FORMATS)}) to FILE ('-' for stdout), e.g. "
                   "--report html=run.html --report junit=run.xml (repeatable).")
@click.option("--timeout", default=None, type=float, help="Watchdog per probe case, seconds [default by profile].")
@click.option("--min-gap", default=0.10, show_default=True, type=float,
              help="Throughput shortfall vs fingerprint peers that counts as slow (0.1 = 10%).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def run(devices: str, probes: str, profile: str, duration: str | None, seed: int, inject: tuple[str, ...],
        db_path: str | None, json_path: str | None, reports: tuple[str, ...], timeout: float | None, min_gap: float,
        quiet: bool) -> None:
    """Run the probes on every device and judge them: pass, wrong, slow, flaky or error."""
    from .fleet import runner
    from .fleet.store import Store, StoreError, default_path
    from .reports import json_report, terminal

    opts = runner.RunOptions(
        devices=devices, probes=tuple(p.strip() for p in probes.split(",") if p.strip()), profile=profile,
        seed=seed, inject=inject, timeout_s=timeout, duration_s=parse_duration(duration) if duration else 0.0,
        min_gap=min_gap, argv=sys.argv,
    )
    try:
        runner.validate(opts)
        if json_path and json_path != "-":
            _check_writable(Path(json_path))
        outputs = _parse_reports(reports)
        store = Store(db_path or default_path())
    except (runner.UsageError, StoreError) as e:
        _fail(str(e))
    done = [0]

    def progress(r: Any) -> None:
        done[0] += 1
        if quiet:
            return
        tf = r.metrics.get("tflops")
        speed = f"{tf:.3f} TFLOP/s" if tf is not None else ""
        click.echo(f"[{done[0]:>4}] rank {r.rank} {r.device} {r.probe} {r.case:<22} {r.verdict.value:<6} {speed}",
                   err=True)

    try:
        summary = runner.execute(opts, store, on_result=progress)
    except runner.UsageError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo(f"chipcheck: interrupted; results so far are in {store.path}", err=True)
        sys.exit(130)
    finally:
        store.close()
    click.echo(terminal.render(summary))
    if json_path:
        text = json_report.render(summary)
        if json_path == "-":
            click.echo(text)
        else:
            Path(json_path).write_text(text + "\n")
    _write_reports(summary, outputs)
    sys.exit(0 if summary.verdict.value == "pass" else 1)


def _parse_reports(specs: tuple[str, ...]) -> list[tuple[str, str]]:
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
            _check_writable(Path(dest), "--report")
        out.append((fmt, dest))
    return out


def _write_reports(summary: Any, outputs: list[tuple[str, str]]) -> None:
    from .reports import formats

    for fmt, dest in outputs:
        text = formats.render(summary, fmt)
        if dest == "-":
            click.echo(text, nl=False)
        else:
            Path(dest).write_text(text)


@main.command()
@click.argument("run_id", default="latest", metavar="[RUN_ID|latest]")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="text (the terminal table), json (chipcheck.run/1), junit (XML for CI), html (self-contained).")
@click.option("-o", "--output", default="-", show_default=True, help="File to write ('-' for stdout).")
def report(run_id: str, db_path: str | None, fmt: str, output: str) -> None:
    """Render a stored run (default: the latest) as text, JSON, JUnit XML or HTML.

    Exits like `chipcheck run`: 0 when every device passed, 1 when any failed, 2 for a bad run id or store.
    """
    from .fleet import reload
    from .fleet.runner import UsageError
    from .fleet.store import StoreError, default_path
    from .reports import formats

    try:
        if output != "-":
            _check_writable(Path(output), "-o")
        store = reload.open_existing(db_path or default_path())
        try:
            summary = reload.load(store, run_id)
        finally:
            store.close()
    except (UsageError, StoreError, reload.RunNotFound) as e:
        _fail(str(e))
    text = formats.render(summary, fmt)
    if output == "-":
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text)
    sys.exit(0 if summary.verdict.value == "pass" else 1)


def _check_writable(p: Path, flag: str = "--json") -> None:
    from .fleet.runner import UsageError

    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: directory {parent} does not exist")
    import os

    if (p.exists() and not os.access(p, os.W_OK)) or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {p} is not writable")


if __name__ == "__main__":
    main()
