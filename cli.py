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


def common_options(fn: Any) -> Any:
    """The options `run`, `links` and the distributed worker (`python -m chipcheck.worker`) share."""
    opts = [
        click.option("--devices", default="auto", show_default=True,
                     help="auto (every GPU, else CPU workers), cpu:N, cuda:0,3"),
        click.option("--profile", default="quick", show_default=True,
                     help="Time budget per device: quick (seconds), standard (~2 min), nightly (~15 min), "
                          "burnin (--duration)."),
        click.option("--duration", default=None, help="Total time for --profile burnin, e.g. 10m or 2h."),
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
        click.option("-q", "--quiet", is_flag=True, help="No progress lines."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def links_options(fn: Any) -> Any:
    fn = click.option("--declared", default=None, type=click.Path(dir_okay=False),
                      help="TOML file declaring the topology: [ranks] 0 = [\"rack1\", \"node1\"] ...; the "
                           "measured grouping is checked against it.")(fn)
    return click.option("--pairing", default="auto", show_default=True,
                        help="all | random:K | auto (all pairs up to 64 endpoints, random:15 above); intra-host "
                             "pairs are always all-pairs.")(fn)


def _options(kw: dict[str, Any], probes: tuple[str, ...], extra: dict[str, str]) -> Any:
    from .fleet import runner

    return runner.RunOptions(
        devices=kw["devices"], probes=probes, profile=kw["profile"], seed=kw["seed"], inject=kw["inject"],
        timeout_s=kw["timeout"], duration_s=parse_duration(kw["duration"]) if kw["duration"] else 0.0,
        min_gap=kw["min_gap"], options=extra, argv=sys.argv,
    )


def _link_extra(pairing: str, declared: str | None) -> dict[str, str]:
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


@main.command()
@click.option("--probes", default="", help="Comma-separated probes to run [default: every probe the devices allow].")
@common_options
def run(probes: str, **kw: Any) -> None:
    """Run the probes on every device and judge them: pass, wrong, slow, flaky or error."""
    names = tuple(p.strip() for p in probes.split(",") if p.strip())
    _execute(lambda: _options(kw, names, {}), kw)


@main.command()
@links_options
@common_options
def links(pairing: str, declared: str | None, **kw: Any) -> None:
    """Measure every link between devices, both directions: latency, bandwidth and payload bits.

    Pairs run in rounds of disjoint pairs (O(N) rounds); a slow or corrupting endpoint is told from
    a single bad link, and the latency matrix is clustered into the inferred topology.
    """
    _execute(lambda: _options(kw, ("links",), _link_extra(pairing, declared)), kw)


def _execute(make_opts: Any, kw: dict[str, Any]) -> None:
    """Validate everything, run on this host's devices, print, write outputs, exit 0/1/2."""
    from .fleet import runner
    from .fleet.store import Store, StoreError, default_path
    from .reports import json_report, terminal

    try:
        opts = make_opts()
        runner.validate(opts)
        if opts.options.get("declared"):
            runner.load_declared(opts.options["declared"])
        if kw["json_path"] and kw["json_path"] != "-":
            _check_writable(Path(kw["json_path"]))
        outputs = _parse_reports(kw["reports"])
        store = Store(kw["db_path"] or default_path())
    except (runner.UsageError, StoreError, click.BadParameter) as e:
        _fail(str(e.format_message() if isinstance(e, click.BadParameter) else e))
    done = [0]

    def progress(r: Any) -> None:
        done[0] += 1
        if kw["quiet"]:
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
    if kw["json_path"]:
        text = json_report.render(summary)
        if kw["json_path"] == "-":
            click.echo(text)
        else:
            Path(kw["json_path"]).write_text(text + "\n")
    _write_reports(summary, outputs)
    sys.exit(0 if summary.verdict.value == "pass" else 1)


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
    _execute_distributed(lambda: _options(kw, names, {}), kw, "run", local_dir, host_label)


@distributed_cli.command("links")
@links_options
@_distributed_options
@common_options
def distributed_links(pairing: str, declared: str | None, local_dir: str, host_label: str | None, **kw: Any) -> None:
    """This rank's part of `chipcheck links`."""
    _execute_distributed(lambda: _options(kw, ("links",), _link_extra(pairing, declared)), kw, "links", local_dir,
                         host_label)


def _execute_distributed(make_opts: Any, kw: dict[str, Any], command: str, local_dir: str,
                         host_label: str | None) -> None:
    from .fleet import distributed, runner
    from .fleet.store import StoreError

    try:
        opts = make_opts()
        runner.validate(opts)
        if opts.options.get("declared"):
            runner.load_declared(opts.options["declared"])
        outputs = _parse_reports(kw["reports"])
        dopts = distributed.DistributedOptions(command=command, db_path=kw["db_path"], json_path=kw["json_path"],
                                               local_dir=local_dir, host=host_label, reports=tuple(outputs))
        code = distributed.run(opts, dopts)
    except (runner.UsageError, StoreError, click.BadParameter) as e:
        _fail(str(e.format_message() if isinstance(e, click.BadParameter) else e))
    sys.exit(code)


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
