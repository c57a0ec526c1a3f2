"""The `chipcheck` command: a thin layer that parses, calls the library, prints, and maps exit codes.

Exit codes: 0 every device passed, 1 some device failed, 2 usage or setup error.
torch is imported only by the commands that need it (and by the workers).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .options import (
    check_writable,
    common_options,
    fail,
    link_extra,
    links_options,
    parse_reports,
    run_options,
)
from .reports.formats import FORMATS
from .reports.progress import case_line


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
        fail(str(e))
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in devs], indent=2))
        return
    for d in devs:
        click.echo(f"{d.index:>3}  {d.label:<8} {d.name:<40} {d.memory_bytes / 2**30:8.1f} GiB  {d.uuid}  "
                   f"host={d.host}  fingerprint={d.fingerprint}")
        click.echo("       " + " ".join(f"{k}={v}" for k, v in sorted(d.fingerprint_fields.items())))


@main.command()
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
        from .fleet import jax_devices

        backend = "jax" if any(given) or jax_devices.sees_tpu() else "torch"
    executor = None
    if backend == "jax":
        import functools

        from .fleet import jax_multihost, jax_runner

        try:
            if any(given) and not all(given):
                raise jax_multihost.MultiHostSpecError(
                    "a multi-host run needs all of --coordinator, --num-processes and --process-id")
            spec = (jax_multihost.MultiHost(coordinator=coordinator, num_processes=num_processes, process_id=process_id)
                    if all(given) else jax_multihost.MultiHost.resolve())
        except jax_multihost.MultiHostSpecError as e:
            fail(str(e))
        executor = functools.partial(jax_runner.execute, multihost=spec)
    _execute(lambda: run_options(kw, names, {}), kw, executor=executor)


@main.command()
@links_options
@common_options
def links(pairing: str, declared: str | None, **kw: Any) -> None:
    """Measure every link between devices, both directions: latency, bandwidth and payload bits.

    Pairs run in rounds of disjoint pairs (O(N) rounds); a slow or corrupting endpoint is told from
    a single bad link, and the latency matrix is clustered into the inferred topology.
    """
    _execute(lambda: run_options(kw, ("links",), link_extra(pairing, declared)), kw)


def _execute(make_opts: Any, kw: dict[str, Any], preface: Any = None, executor: Any = None) -> None:
    """Validate everything, run on this host's devices, print, write outputs, exit 0/1/2.

    `preface(store_path)`, when given, prints first once the run is stored (a sweep's news)."""
    from .fleet import runner
    from .fleet.store import Store, StoreError, default_path
    from .reports import json_report, terminal

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
    if kw["json_path"]:
        text = json_report.render(summary)
        if kw["json_path"] == "-":
            click.echo(text)
        else:
            Path(kw["json_path"]).write_text(text + "\n")
    extras = _stored_extras(store.path, summary) if any(f in ("ocp", "prom") for f, _ in outputs) else None
    _write_reports(summary, outputs, extras)
    if not kw["quiet"]:
        again = f"chipcheck report {summary.run_id}" + ("" if kw["db_path"] is None else f" --db {store.path}")
        click.echo(f"results: run {summary.run_id} in {store.path}; see them again with `{again}`", err=True)
    sys.exit(0 if summary.verdict.value == "pass" else 1)


def _is_tty(*, err: bool) -> bool:
    stream = sys.stderr if err else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


def _stored_extras(db_path: Any, summary: Any) -> Any:
    """What the OCP and Prometheus reports show beyond the summary (DUT info, history), from the store."""
    from .fleet import reload
    from .fleet.store import StoreError

    try:
        store = reload.open_existing(db_path)
        try:
            return reload.extras(store, summary)
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

        from .reports.progress import Progress

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
    from .fleet import devices, runner

    try:
        devs = devices.discover(opts.devices)
        n = sum(len(cases) for _, cases in runner.plan_probes(opts, devs))
    except Exception:  # the runner reports the same problem properly a moment later
        return []
    return [(f"{d.host} {d.label}", n) for d in devs]


def _write_reports(summary: Any, outputs: list[tuple[str, str]], extras: Any = None) -> None:
    from .reports import formats

    for fmt, dest in outputs:
        text = formats.render(summary, fmt, extras if fmt in ("ocp", "prom") else None)
        if dest == "-":
            click.echo(text, nl=False)
        else:
            _write_atomic(Path(dest), text)


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader (node_exporter's textfile collector, a log
    shipper) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@main.command()
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
    from .fleet import reload
    from .fleet.runner import UsageError
    from .fleet.store import StoreError, default_path
    from .reports import formats

    try:
        if output != "-":
            check_writable(Path(output), "-o")
        outputs = parse_reports(reports)
        store = reload.open_existing(db_path or default_path())
        try:
            summary = reload.load_many(store, list(run_ids) or [reload.LATEST])
            wanted = {fmt} | {f for f, _ in outputs}
            extras = reload.extras(store, summary) if wanted & formats.NEEDS_EXTRAS else None
        finally:
            store.close()
    except (UsageError, StoreError, reload.RunNotFound) as e:
        fail(str(e))
    text = formats.render(summary, fmt, extras)
    if output == "-":
        click.echo(text, nl=False)
    else:
        _write_atomic(Path(output), text)
    for f, dest in outputs:
        extra_text = formats.render(summary, f, extras)
        if dest == "-":
            click.echo(extra_text, nl=False)
        else:
            _write_atomic(Path(dest), extra_text)
    sys.exit(0 if summary.verdict.value == "pass" and summary.status.value == "complete" else 1)


@main.group()
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
    from .fleet import reload
    from .fleet.runner import UsageError
    from .fleet.store import StoreError, default_path
    from .reports import formats

    try:
        if output != "-":
            check_writable(Path(output), "-o")
        store = reload.open_existing(db_path or default_path())
        try:
            summary = reload.load(store, run_id)
            extras = reload.extras(store, summary)
        finally:
            store.close()
    except (UsageError, StoreError, reload.RunNotFound) as e:
        fail(str(e))
    text = formats.render(summary, "prom", extras)
    if output == "-":
        click.echo(text, nl=False)
    else:
        _write_atomic(Path(output), text)
        click.echo(f"wrote {output} (run {summary.run_id}, {len(summary.devices)} devices)", err=True)


@main.command()
@click.option("--launcher", type=click.Choice(["local", "slurm", "k8s"]), required=True,
              help="local: run here; slurm: write (and --submit) an sbatch script; k8s: write an Indexed Job manifest.")
@click.option("--probes", default="", help="Comma-separated probes to run [default: every probe the devices allow].")
@click.option("--backend", type=click.Choice(["torch", "jax"]), default="torch", show_default=True,
              help="torch: one worker per GPU; jax: one `chipcheck run --backend jax` process per host driving all "
                   "its devices (GPUs, TPUs), the hosts joined into one JAX job (docs/jax.md). With --launcher "
                   "local it is `chipcheck run --backend jax` on this host.")
@click.option("--nodes", default=1, show_default=True, type=int, help="Hosts in the sweep (slurm, k8s).")
@click.option("--ntasks-per-node", "per_node", default=8, show_default=True, type=int,
              help="Workers per host: one per GPU, or per virtual CPU device with --devices cpu (slurm, k8s; "
                   "always 1 with --backend jax).")
@click.option("--gpus-per-task", default=1, show_default=True, type=int,
              help="GPUs per worker (0, and ignored, with --devices cpu).")
@click.option("--gpus-per-node", default=None, type=int,
              help="--backend jax: GPUs/TPUs per host, all to its one process (slurm: --gpus-per-node; k8s: that "
                   "many --gpu-resource, e.g. google.com/tpu; 0: ask for none) [default: 8].")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time", "time_limit", default=None, help="Slurm time limit, e.g. 00:30:00.")
@click.option("--job-name", default="chipcheck", show_default=True)
@click.option("--image", default="chipcheck:latest", show_default=True, help="Container image (k8s).")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--node-selector", multiple=True, metavar="KEY=VALUE", help="k8s node selector (repeatable).")
@click.option("--gpu-resource", default="nvidia.com/gpu", show_default=True, help="k8s GPU resource name.")
@click.option("--master-port", default=29500, show_default=True, type=int, help="Rendezvous port on the first node.")
@click.option("--local-dir", default="chipcheck-shards", show_default=True,
              help="Where each rank keeps its JSONL shard (shared storage collects every node's).")
@click.option("-o", "--output", default=None, help="Script/manifest file [default: JOB-NAME.sbatch / JOB-NAME.yaml].")
@click.option("--submit", is_flag=True, help="slurm: sbatch the script; prints the job id.")
@click.option("--wait", is_flag=True, help="With --submit: wait for the job and exit with its code.")
@common_options
def sweep(launcher: str, probes: str, backend: str, nodes: int, per_node: int, gpus_per_task: int,
          gpus_per_node: int | None, partition: str | None, time_limit: str | None, job_name: str, image: str,
          namespace: str, node_selector: tuple[str, ...], gpu_resource: str, master_port: int, local_dir: str,
          output: str | None, submit: bool, wait: bool, **kw: Any) -> None:
    """A fleet sweep on the engine the fleet already uses: this machine, Slurm (srun) or Kubernetes."""
    import os

    from click.core import ParameterSource

    from .fleet import k8s, slurm
    from .fleet import sweep as sweepmod
    from .fleet.runner import UsageError

    names = tuple(p.strip() for p in probes.split(",") if p.strip())
    source = click.get_current_context().get_parameter_source
    try:
        if backend == "jax":
            if source("per_node") is not ParameterSource.DEFAULT and per_node != 1:
                raise sweepmod.SweepError(f"--backend jax runs one process per node, driving all its devices; drop "
                                          f"--ntasks-per-node {per_node}")
            if source("gpus_per_task") is not ParameterSource.DEFAULT:
                raise sweepmod.SweepError("--backend jax gives all of a node's devices to its one process: use "
                                          "--gpus-per-node, not --gpus-per-task")
        elif gpus_per_node is not None:
            raise sweepmod.SweepError("--gpus-per-node is for --backend jax; torch workers ask for --gpus-per-task")
    except sweepmod.SweepError as e:
        fail(str(e))
    executor = None
    if backend == "jax":
        import functools

        from .fleet import jax_multihost, jax_runner

        try:
            multihost = jax_multihost.MultiHost.resolve() if launcher == "local" else None
            jax_runner.validate_jax(run_options(kw, names, {}))  # what the JAX path cannot do, before writing anything
        except (jax_multihost.MultiHostSpecError, UsageError) as e:
            fail(str(e))
        executor = functools.partial(jax_runner.execute, multihost=multihost)
    if launcher == "local":  # --backend jax: exactly `chipcheck run --backend jax`, with the news first
        _execute(lambda: run_options(kw, names, {}), kw, preface=lambda path: _print_news(path), executor=executor)
    try:
        sel = tuple(tuple(x.split("=", 1)) for x in node_selector)
        if any(len(x) != 2 or not x[0] for x in sel):
            raise sweepmod.SweepError("--node-selector expects KEY=VALUE, e.g. nvidia.com/gpu.product=H100")
        cpu = kw["devices"].startswith("cpu")
        if backend == "jax":
            every, first = sweepmod.jax_args(kw, probes)
            shape: dict[str, Any] = {"procs_per_node": 1, "worker_args": every, "first_args": first,
                                     "gpus_per_proc": 8 if gpus_per_node is None else gpus_per_node}
        else:
            shape = {"procs_per_node": per_node, "gpus_per_proc": 0 if cpu else gpus_per_task,
                     "worker_args": sweepmod.worker_args("run", kw, probes, local_dir)}
        spec = sweepmod.SweepSpec(
            nodes=nodes, backend=backend, job_name=job_name, **shape,
            workdir=os.getcwd(), db_path=kw["db_path"], local_dir=local_dir, master_port=master_port,
            partition=partition, time_limit=time_limit, image=image, namespace=namespace,
            node_selector=sel, gpu_resource=gpu_resource)  # type: ignore[arg-type]
        from .fleet import runner

        runner.validate(run_options(kw, names, {}))  # the worker options are checked here, not on 1,000 nodes
        if launcher == "slurm":
            text = slurm.script(spec)
            path = Path(output or f"{job_name}.sbatch")
        else:
            docs = k8s.manifest(spec)
            errors = k8s.validate(docs)
            if errors:
                raise sweepmod.SweepError("the manifest does not validate: " + "; ".join(errors))
            text, path = k8s.to_yaml(docs), Path(output or f"{job_name}.yaml")
        check_writable(path, "-o")
        path.write_text(text)
        click.echo(f"wrote {path}", err=True)
        if submit and launcher == "k8s":
            raise sweepmod.SweepError(f"--submit is for slurm; apply the manifest with `kubectl apply -f {path}`")
        if submit:
            job, code = slurm.submit(str(path), wait=wait)
            click.echo(job)
            sys.exit(code if wait else 0)
    except (sweepmod.SweepError, UsageError, click.BadParameter) as e:
        fail(str(e.format_message() if isinstance(e, click.BadParameter) else e))


def _print_news(db_path: Any) -> None:
    """What is new since the last sweep: the first thing a sweep reports."""
    from .fleet import history
    from .fleet.store import Store

    store = Store(db_path)
    try:
        rep = history.report(store)
    finally:
        store.close()
    for line in _news_lines(rep):
        click.echo(line)


def _news_lines(rep: Any) -> list[str]:
    if rep.latest is None:
        return ["no judged runs in the store yet"]
    out = [f"New since the last sweep (run {rep.latest}, {len(rep.runs)} runs in history):"]
    news = [f"  {n.host} {n.device} {n.uuid}: {n.verdict.value} (was {n.before.value if n.before else 'not seen'})"
            for n in rep.new_failures]
    news += [f"  {', '.join(f.hosts)} {f.device} {f.code.code} {f.code.action.value}: {f.detail}"
             for f in rep.new_findings]
    return out + (news or ["  nothing"])


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
def ingest(paths: tuple[str, ...], db_path: str | None) -> None:
    """Merge JSONL result shards (files, or folders of them) into the store; ingesting twice adds nothing."""
    from .fleet import ingest as ingestmod
    from .fleet.store import Store, StoreError, default_path

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


@main.command()
@click.argument("key", required=False, metavar="[DEVICE-UUID|HOST]")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="SQLite results store [default: ~/.local/state/chipcheck/results.db].")
@click.option("--min-drop", default=0.10, show_default=True, type=float,
              help="Fall in throughput against a device's own history that counts as a trend (0.1 = 10%).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def history(key: str | None, db_path: str | None, min_drop: float, as_json: bool) -> None:
    """Verdicts and throughput of a device (or a host's devices) over runs; without one, the fleet's trends."""
    from dataclasses import asdict

    from .fleet import history as hist
    from .fleet import reload, trends
    from .fleet.store import StoreError, default_path

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
    for line in _news_lines(rep):
        click.echo(line)
    click.echo("Trends:" if rep.findings else "Trends: none")
    for f in rep.findings:
        click.echo(f"  {f.code.code} {f.code.severity.label:<8} {f.code.action.value:<12} {', '.join(f.hosts)} "
                   f"{f.device} {f.subject}: {f.detail}{' [new]' if f.new else ''}")


@main.command()
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
    from .fleet import history as hist
    from .fleet import quarantine as q
    from .fleet import reload
    from .fleet.store import StoreError, default_path

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


@main.group()
def repro() -> None:
    """Capture replay, shrinking to one file, and vendor bundles (docs/reproducers.md)."""


def _repro_call(fn: Any) -> Any:
    """Run a reproducers call; a bad capture or a case that no longer fails is one line, exit 2."""
    from .reproducers import format as rfmt
    from .reproducers.replay import ReplayError
    from .reproducers.shrink import NotReproducible

    try:
        return fn()
    except (rfmt.CaptureError, ReplayError, NotReproducible) as e:
        fail(str(e))
    except ValueError as e:  # a malformed --inject spec
        fail(str(e))


_REFERENCE = click.option("--reference", default="cpu64", show_default=True,
                          help="cpu64 (float64 on the CPU), a device (cpu, cuda:1) or rank:N.")
_INJECT = click.option("--inject", default=None,
                       help="Simulation hook: a probes/faults.py spec applied to the suspect's kernels.")


@repro.command("replay")
@click.argument("capture_dir", metavar="CAPTURE")
@_REFERENCE
@click.option("--device", default=None, help="Suspect device [default: where the capture ran].")
@click.option("--rank", type=int, default=None, help="Which rank's capture [default: the lowest].")
@_INJECT
def repro_replay(capture_dir: str, reference: str, device: str | None, rank: int | None, inject: str | None) -> None:
    """Replay op by op; name the first op that differs from the reference. Exit 1 when one does."""
    from .reproducers import format as rfmt
    from .reproducers import replay as rp

    res = _repro_call(lambda: rp.replay(rfmt.load(capture_dir, rank), device=device, reference=reference,
                                        inject=inject))
    if res.capture_mismatch is not None:
        click.echo(f"note: replay differs from the captured bits first at op #{res.capture_mismatch}")
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
    from .reproducers import emit
    from .reproducers import shrink as sk
    from .reproducers import verify as vf

    _check_output(output, "-o")  # before the shrink, not after it
    if collective:
        case = _repro_call(lambda: sk.shrink_collective(capture_dir, device=device))
        text = emit.render_collective(case, metric_line=case.divergence.metric.line())
        click.echo(f"{case.op}: {case.world} ranks; {case.divergence.metric.line()}")
        check = vf.verify(text, suspect="cpu", reference="cpu", hook=_repro_call(lambda: vf.collective_hook(inject)),
                          collective=True)
    else:
        r = _repro_call(lambda: sk.shrink_capture(capture_dir, reference=reference, device=device, rank=rank,
                                                  inject=inject, repeats=repeat, live_inject=live_inject,
                                                  passes=passes))
        text = emit.render_ops(r.history, r.case, device=r.divergence.device, metric_line=r.metric.line(),
                               where=r.stack, rate=r.rate, settings=r.settings,
                               recorded=r.recorded if r.settings_shrunk else None)
        shapes = ", ".join(f"{i.shape} {i.kind}" for i in r.case.inputs)
        after = f" after {len(r.history)} earlier ops ({', '.join(c.op for c in r.history)})" if r.history else ""
        click.echo(f"op #{r.divergence.index} {r.case.op}({shapes}){after}: {r.metric.line()} "
                   f"[{r.tries} candidates, {r.seconds:.1f} s]")
        if r.rate is not None:
            click.echo(r.rate.line())
        hook = _repro_call(lambda: vf.hook_spec(inject, r.divergence.rank, op=r.case.op, history=bool(r.history),
                                                live=live_inject))
        ref_dev = _repro_call(lambda: vf.reference_device(reference, capture_dir))
        # as many runs as the vendor's default (the trial plan), and never fewer than 10: the evidence
        # chip against chip is then worth a p-value
        check = vf.verify(text, suspect=r.divergence.device, reference=ref_dev, hook=hook,
                          repeat=max(10, r.rate.plan if r.rate else 1))
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


@repro.command("bundle")
@click.argument("source", metavar="CAPTURE-or-repro.py")
@click.option("--repro", "repro_path", default=None, help="With a CAPTURE: its repro.py.")
@click.option("--redact", is_flag=True, help="Strip module names, file paths and stack frames.")
@click.option("--db", "db_path", default=None, help="Results store for the chip's chipcheck history.")
@click.option("-o", "--output", default="bundle.tar.gz", show_default=True)
def repro_bundle(source: str, repro_path: str | None, redact: bool, db_path: str | None, output: str) -> None:
    """Pack repro.py, env.json, history, input hashes and a README for the vendor."""
    from .reproducers import bundle

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
    from .fleet.runner import UsageError

    if Path(path).is_dir():
        fail(f"{flag} {path} is a directory; name a file")
    try:
        check_writable(Path(path), flag)
    except UsageError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
