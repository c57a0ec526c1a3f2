"""`chipcheck list`, `run` and `links`: measure the devices, judge, print and write the reports."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from ..options import (
    check_writable,
    common_options,
    fail,
    link_extra,
    links_options,
    parse_reports,
    run_options,
)
from ..reports.progress import case_line
from .common import write_output


@click.command("list")
@click.option("--devices", default="auto", show_default=True, help="auto, cpu:N or cuda:0,3")
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
def list_cmd(devices: str, as_json: bool) -> None:
    """List the devices found on this host, with their fingerprints."""
    from ..fleet import devices as devmod

    try:
        devs = devmod.discover(devices)
    except devmod.DeviceSpecError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in devs], indent=2))
        return
    for d in devs:
        click.echo(f"{d.index:>3}  {d.label:<8} {d.name:<40} {d.memory_bytes / 2**30:8.1f} GiB  {d.uuid}  "
                   f"host={d.host}  fingerprint={d.fingerprint}")
        click.echo("       " + " ".join(f"{k}={v}" for k, v in sorted(d.fingerprint_fields.items())))


@click.command()
@click.option("--probes", default="", help="Comma-separated probes to run [default: every probe the devices allow].")
@click.option("--backend", type=click.Choice(["auto", "torch", "jax"]), default="auto", show_default=True,
              help="torch: one worker per device; jax: the probes through JAX/XLA in one process driving every "
                   "device JAX sees on this host (TPUs; docs/jax.md); auto: jax when JAX sees TPUs here, else torch.")
@click.option("--coordinator", default=None, metavar="HOST:PORT",
              help="--backend jax on several hosts: process 0's address (it serves the JAX coordinator there and "
                   "chipcheck's results store on PORT+1) [default: $CHIPCHECK_JAX_COORDINATOR, or what JAX "
                   "detects under Slurm / on TPU pods].")
@click.option("--num-processes", type=int, default=None, help="Multi-host JAX: processes in the job, one per host.")
@click.option("--process-id", type=int, default=None, help="Multi-host JAX: this process's id, 0 .. N-1.")
@common_options
def run(probes: str, backend: str, coordinator: str | None, num_processes: int | None, process_id: int | None,
        **kw: Any) -> None:
    """Run the probes on every device and judge them: pass, wrong, slow, flaky or error."""
    names = tuple(p.strip() for p in probes.split(",") if p.strip())
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and backend == "torch":
        fail("--coordinator/--num-processes/--process-id are for --backend jax (torch runs use torchrun or "
              "`chipcheck sweep`)")
    if backend == "auto":
        from ..fleet import jax_devices

        backend = "jax" if any(given) or jax_devices.sees_tpu() else "torch"
    executor = None
    if backend == "jax":
        import functools

        from ..fleet import jax_multihost, jax_runner

        try:
            if any(given) and not all(given):
                raise jax_multihost.MultiHostSpecError(
                    "a multi-host run needs all of --coordinator, --num-processes and --process-id")
            spec = (jax_multihost.MultiHost(coordinator=coordinator, num_processes=num_processes, process_id=process_id)
                    if all(given) else jax_multihost.MultiHost.resolve())
        except jax_multihost.MultiHostSpecError as e:
            fail(str(e))
        executor = functools.partial(jax_runner.execute, multihost=spec)
    execute(lambda: run_options(kw, names, {}), kw, executor=executor)


@click.command()
@links_options
@common_options
def links(pairing: str, declared: str | None, **kw: Any) -> None:
    """Measure every link between devices, both directions: latency, bandwidth and payload bits.

    Pairs run in rounds of disjoint pairs (O(N) rounds); a slow or corrupting endpoint is told from
    a single bad link, and the latency matrix is clustered into the inferred topology.
    """
    execute(lambda: run_options(kw, ("links",), link_extra(pairing, declared)), kw)


def execute(make_opts: Any, kw: dict[str, Any], preface: Any = None, executor: Any = None) -> None:
    """Validate everything, run on this host's devices, print, write outputs, exit 0/1/2.

    `preface(store_path)`, when given, prints first once the run is stored (a sweep's news)."""
    from ..fleet import runner
    from ..fleet.store import Store, StoreError, default_path
    from ..reports import json_report, terminal

    try:
        opts = make_opts()
        runner.validate(opts)
        if opts.options.get("declared"):
            runner.load_declared(opts.options["declared"])
        if kw["json_path"] and kw["json_path"] != "-":
            check_writable(Path(kw["json_path"]))
        outputs = parse_reports(kw["reports"])
        store = Store(kw["db_path"] or default_path())
    except (runner.UsageError, StoreError, click.BadParameter) as e:
        fail(str(e.format_message() if isinstance(e, click.BadParameter) else e))
    calm = not kw["quiet"] and not kw.get("verbose") and _is_tty(err=True)
    live = _LiveProgress(opts if executor is None else None) if calm else None
    done = [0]

    def progress(r: Any) -> None:
        done[0] += 1
        if live is not None:
            live.result(r)
        elif not kw["quiet"]:
            click.echo(case_line(done[0], r), err=True)

    hooks: dict[str, Any] = {"on_result": progress}
    if live is not None and executor is None:  # the torch runner says when each case starts
        hooks["on_start"] = live.start
    try:
        summary = (executor or runner.execute)(opts, store, **hooks)
    except (runner.UsageError, StoreError) as e:  # StoreError: a write failed (full disk); the message says where
        fail(str(e))
    except KeyboardInterrupt:
        click.echo(f"chipcheck: interrupted; results so far are in {store.path}", err=True)
        sys.exit(130)
    finally:
        if live is not None:
            live.close()
        store.close()
    if preface is not None:
        preface(store.path)
    compact = not kw.get("verbose") and _is_tty(err=False)
    click.echo(terminal.render_compact(summary) if compact else terminal.render(summary))
    kept = (f"; the run's results are in {store.path}: `chipcheck report {summary.run_id} --db {store.path} "
            f"--format FORMAT -o FILE` writes them again")
    if kw["json_path"]:
        text = json_report.render(summary)
        if kw["json_path"] == "-":
            click.echo(text)
        else:
            write_output(Path(kw["json_path"]), text + "\n", "--json", kept)
    extras = stored_extras(store.path, summary) if any(f in ("ocp", "prom") for f, _ in outputs) else None
    write_reports(summary, outputs, extras, kept)
    if not kw["quiet"]:
        again = f"chipcheck report {summary.run_id}" + ("" if kw["db_path"] is None else f" --db {store.path}")
        click.echo(f"results: run {summary.run_id} in {store.path}; see them again with `{again}`", err=True)
    sys.exit(0 if summary.verdict.value == "pass" else 1)


def _is_tty(*, err: bool) -> bool:
    stream = sys.stderr if err else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


def stored_extras(db_path: Any, summary: Any) -> Any:
    """What the OCP and Prometheus reports show beyond the summary (DUT info, history), from the store."""
    from ..fleet import history, reload
    from ..fleet.store import StoreError

    try:
        store = reload.open_existing(db_path)
        try:
            return history.report_extras(store, summary)
        finally:
            store.close()
    except StoreError:
        return None


class _LiveProgress:
    """One line per device on the terminal (stderr), redrawn in place as cases start and end, and once a
    second for the clock. Only ever used on a TTY; `-v` and non-terminal output stream `case_line`s."""

    def __init__(self, opts: Any) -> None:
        import threading
        import time

        from ..reports.progress import Progress

        self.state = Progress(started=time.time())
        self.drawn = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        for rank, (label, total) in enumerate(_planned(opts)):
            d = self.state.device(rank, label)
            d.total = total
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        self.ticker.start()

    def start(self, rank: int, probe: str, case: str) -> None:
        with self.lock:
            self.state.start(rank, probe, case)
            self._draw()

    def result(self, r: Any) -> None:
        with self.lock:
            self.state.result(r)
            self._draw()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:
                self._draw()

    def _draw(self) -> None:
        import shutil
        import time

        width = max(40, shutil.get_terminal_size((120, 24)).columns - 1)
        lines = self.state.lines(time.time(), width)
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        click.echo(up + "".join(f"\x1b[2K{line}\n" for line in lines), err=True, nl=False)
        self.drawn = len(lines)

    def close(self) -> None:
        self.stop.set()
        self.ticker.join(timeout=2.0)
        with self.lock:
            for d in self.state.devices.values():
                d.current, d.finished = "", True
            self._draw()


def _planned(opts: Any) -> list[tuple[str, int | None]]:
    """(label, cases planned) per rank for the progress lines; empty when the plan cannot be known here
    (the JAX path discovers its own devices; the lines then fill in as results arrive)."""
    if opts is None:
        return []
    from ..fleet import devices, runner

    try:
        devs = devices.discover(opts.devices)
        n = sum(len(cases) for _, cases in runner.plan_probes(opts, devs))
    except Exception:  # the runner reports the same problem properly a moment later
        return []
    return [(f"{d.host} {d.label}", n) for d in devs]


def write_reports(summary: Any, outputs: list[tuple[str, str]], extras: Any = None, kept: str = "") -> None:
    from ..reports import formats

    for fmt, dest in outputs:
        text = formats.render(summary, fmt, extras if fmt in ("ocp", "prom") else None)
        if dest == "-":
            click.echo(text, nl=False)
        else:
            write_output(Path(dest), text, "--report", kept)


