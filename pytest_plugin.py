"""pytest plugin: `pytest --chipcheck[=PROFILE]` runs the health check as a test suite.

Fleets already run health checks as test suites; this gives them chipcheck with pytest's JUnit
(`--junitxml`), selection (`-k "cpu:3 and matmul"`) and CI integration for free:

- every device x probe is one test item, `chipcheck::<probe>[<device>]`, run in a real worker
  process on that device through the local launcher (watchdog, crash isolation), with the device's
  own oracles deciding pass/fail; `--chipcheck-inject` works as `chipcheck run --inject` does;
- with pytest-xdist (`-n N`), devices are pinned to workers by worker id: device d runs on worker
  `gw{d mod N}` (so `-n 8` on an 8-GPU host gives gw0 -> cuda:0, ..., gw7 -> cuda:7), never two
  workers on one device;
- after the last item, the fleet judgements (consensus among a fingerprint's devices, slowness
  against peers) run over every result and a failing one fails the session.

Installed with chipcheck (entry point `pytest11`), so it is loaded into every pytest session of the
environment: it adds its options and does nothing else unless `--chipcheck` is given. Under
`--chipcheck`, test files are not collected; the session is the health check. Write
`--chipcheck=PROFILE` (with `=`): a bare `--chipcheck` followed by a path would read it as the profile.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .results import DeviceInfo, Judgement, ProbeResult

RESULT_PROPERTY = "chipcheck_result"
"""user_properties key carrying each ProbeResult (as JSON) from an xdist worker to the controller."""
_DEVICE_IN_NODEID = re.compile(r"\[(\w+):(\d+)\]$")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chipcheck", "chipcheck accelerator health check")
    group.addoption("--chipcheck", action="store", nargs="?", const="quick", default=None, metavar="PROFILE",
                    help="Run the chipcheck probes as tests instead of collecting test files; PROFILE: quick "
                         "(default), standard, nightly.")
    group.addoption("--chipcheck-devices", default="auto", metavar="SPEC",
                    help="Devices to check: auto, cpu:N or cuda:0,3 (default auto).")
    group.addoption("--chipcheck-probes", default="", metavar="NAMES",
                    help="Comma-separated probes (default: every default probe).")
    group.addoption("--chipcheck-seed", type=int, default=0, help="Base seed of every input (default 0).")
    group.addoption("--chipcheck-inject", action="append", default=[], metavar="SPEC",
                    help="Inject a fault, as `chipcheck run --inject` (repeatable).")
    group.addoption("--chipcheck-timeout", type=float, default=None, metavar="SECONDS",
                    help="Watchdog per probe case (default by profile).")
    group.addoption("--chipcheck-min-gap", type=float, default=0.10,
                    help="Throughput shortfall against fingerprint peers that counts as slow (default 0.1).")


def _enabled(config: pytest.Config) -> bool:
    return config.getoption("chipcheck", default=None) is not None


def pytest_configure(config: pytest.Config) -> None:
    if not _enabled(config):
        return  # inert: none of the hooks below is registered without --chipcheck
    config.addinivalue_line("markers", "chipcheck: a chipcheck probe on one device (added by --chipcheck)")
    config.pluginmanager.register(ChipcheckSession(config), "chipcheck-session")


class ChipcheckSession:
    """The hooks of one `pytest --chipcheck` session, and what its items share."""

    def __init__(self, config: pytest.Config):
        from .fleet import runner

        self.config = config
        workerinput = getattr(config, "workerinput", None)
        self.is_xdist_worker = workerinput is not None
        self.run_id: str = (workerinput or {}).get("chipcheck_run_id") or (
            runner.new_run_id("pytest-"))
        self.options = runner.RunOptions(
            devices=config.getoption("chipcheck_devices"), profile=config.getoption("chipcheck"),
            probes=tuple(p.strip() for p in config.getoption("chipcheck_probes").split(",") if p.strip()),
            seed=config.getoption("chipcheck_seed"), inject=tuple(config.getoption("chipcheck_inject")),
            timeout_s=config.getoption("chipcheck_timeout"), min_gap=config.getoption("chipcheck_min_gap"),
        )
        if self.options.profile == "burnin":
            raise pytest.UsageError("--chipcheck=burnin needs a duration: use `chipcheck run --profile burnin`")
        try:
            runner.validate(self.options)
        except runner.UsageError as e:
            raise pytest.UsageError(f"--chipcheck: {e} (write the profile as --chipcheck=PROFILE)") from None
        self.timeout_s: float = self.options.timeout_s or runner.DEFAULT_TIMEOUT_S[self.options.profile]
        self.results: list[ProbeResult] = []
        self.judged: list[Judgement] = []

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist controller: every worker shares the controller's run id."""
        node.workerinput["chipcheck_run_id"] = self.run_id

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """Pin devices to xdist workers by worker id (device d -> gw{d mod N})."""
        return DeviceScheduling(config, log)

    def pytest_ignore_collect(self, collection_path: Any, config: pytest.Config) -> bool:
        return True  # under --chipcheck the session is the health check: test files are not collected

    @pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, which must see our items
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        from .fleet import devices, runner

        try:
            devs = devices.discover(self.options.devices)
            plan = runner.plan_probes(self.options, devs)
        except (devices.DeviceSpecError, runner.UsageError) as e:
            raise pytest.UsageError(f"--chipcheck: {e}") from None
        root = ChipcheckRun.from_parent(session, name="chipcheck", nodeid="chipcheck", owner=self,
                                        devices=devs, plan=plan)
        # collected through the public hooks, so reporters count the items like any others
        rep = root.ihook.pytest_make_collect_report(collector=root)
        root.ihook.pytest_collectreport(report=rep)
        items.extend(x for x in rep.result if isinstance(x, pytest.Item))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect every result (in the controller too, under xdist) for the fleet judgement at the end."""
        if report.when != "call" or self.is_xdist_worker:
            return
        from .results import ProbeResult

        self.results.extend(ProbeResult.from_dict(json.loads(v)) for k, v in report.user_properties
                            if k == RESULT_PROPERTY)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.is_xdist_worker:
            return  # the controller judges the fleet, over every worker's results
        self.judged = fleet_judgements(self.results, self.options.min_gap)
        if self.judged and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_xdist_worker:
            return
        ranks = {r.rank for r in self.results}
        terminalreporter.section("chipcheck fleet judgement")
        terminalreporter.line(f"run {self.run_id}: {len(self.results)} case results from {len(ranks)} device(s); "
                              f"consensus and speed against fingerprint peers:")
        if not self.judged:
            terminalreporter.line("no device disagrees with its peers or is slower than them")
        for j in self.judged:
            terminalreporter.line(f"{j.verdict.value.upper()} rank {j.rank} {j.probe} {j.case}: {j.reason}", red=True)


def fleet_judgements(results: list[ProbeResult], min_gap: float) -> list[Judgement]:
    """Consensus, blame and slowness over every device's results: the part no single item can judge
    (the fleet judge's own rules; a speed suspect is reported, not called slow: no retest runs here)."""
    from .fleet.judge.verdicts import fleet_verdicts
    from .results import DeviceInfo, DeviceKind, Verdict

    # the items' results carry where they ran, not the inventory (xdist workers discovered it)
    devs = {r.rank: DeviceInfo(index=r.rank, kind=DeviceKind(r.device.partition(":")[0]), name=r.device,
                               memory_bytes=0, uuid=r.device_uuid, host=r.host, fingerprint=r.fingerprint)
            for r in results}
    v = fleet_verdicts(devs, results, min_gap=min_gap)
    return [j for j in v.judgements if j.verdict is not Verdict.PASS]


class ChipcheckRun(pytest.Collector):
    """The parent of every chipcheck item: one per (probe, device), one per collective probe."""

    def __init__(self, *, owner: ChipcheckSession, devices: list[DeviceInfo], plan: list[tuple[str, list[str]]],
                 **kw: Any):
        super().__init__(**kw)
        self.owner, self.devices, self.plan = owner, devices, plan

    def collect(self) -> list[pytest.Item]:
        from .probes import base

        out: list[pytest.Item] = []
        for probe, cases in self.plan:
            if base.registry()[probe].collective:
                out.append(ProbeItem.from_parent(self, name=f"{probe}[all]", device=None, probe=probe, cases=cases,
                                                 owner=self.owner))
                continue
            for dev in self.devices:
                out.append(ProbeItem.from_parent(self, name=f"{probe}[{dev.label}]", device=dev, probe=probe,
                                                 cases=cases, owner=self.owner))
        return out


class ProbeFailed(Exception):
    """The device's own oracles judged a case wrong, flaky or slow, or it could not run."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class ProbeItem(pytest.Item):
    """One probe on one device."""

    def __init__(self, *, device: DeviceInfo | None, probe: str, cases: list[str], owner: ChipcheckSession,
                 **kw: Any):
        super().__init__(**kw)
        self.owner = owner
        self.device = device
        self.probe = probe
        self.cases = cases
        self.add_marker("chipcheck")
        if device is not None:
            # -k can select by host, uuid or fingerprint too, not only by the item name
            self.extra_keyword_matches.update({device.host, device.uuid, device.fingerprint, device.kind.value})

    def runtest(self) -> None:
        from .results import ErrorKind, Verdict

        if self.device is None:
            pytest.skip(f"{self.probe} is a collective probe: it needs every device at once; run "
                        f"`chipcheck run --probes {self.probe}`")
        results = _run_on_device(self.owner, self.device, self.probe, self.cases)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        for r in results:
            self.user_properties.append((RESULT_PROPERTY, r.to_json()))
        self.user_properties.append(("device", f"{self.device.host} {self.device.label} uuid={self.device.uuid}"))
        if worker:
            self.user_properties.append(("xdist_worker", worker))
        bad = [r for r in results if r.held is not Verdict.PASS]  # a shared value is the fleet judgement's
        if bad and all(r.error is not None and r.error.kind is ErrorKind.UNSUPPORTED for r in bad):
            pytest.skip("; ".join(r.error.message for r in bad if r.error))
        if bad:
            from .fleet.summary import explain

            raise ProbeFailed([f"{r.verdict.value.upper()}: {explain(r)}" for r in bad])

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ProbeFailed):
            return "\n".join(excinfo.value.lines)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        where = f"{self.device.host} {self.device.label}" if self.device else "all devices"
        return self.path, None, f"chipcheck {self.probe} on {where}"


def _run_on_device(st: ChipcheckSession, dev: DeviceInfo, probe: str, cases: list[str]) -> list[ProbeResult]:
    """One probe's cases on one device, in a real worker process (the launcher's watchdog applies)."""
    from .fleet.launch import LaunchRequest, run_local

    out: list[ProbeResult] = []
    req = LaunchRequest(run_id=st.run_id, devices=[dev], probes=[(probe, list(cases))],
                        profile=st.options.profile, seed=st.options.seed, timeout_s=st.timeout_s,
                        inject=_faults_for(st.options.inject, dev.index))
    run_local(req, out.append)
    # a one-device launch is rank 0 there; in the fleet this device is rank dev.index
    return [replace(r, rank=dev.index) for r in out]


def _faults_for(specs: Sequence[str], index: int) -> list[str]:
    """Re-aim `rank=`-targeted faults at a one-device launch, where the device is rank 0."""
    from .probes import faults

    out = []
    for spec in specs:
        for f in faults.parse(spec):
            if f.ranks is None:
                out.append(f.spec())
            elif index in f.ranks:
                out.append(replace(f, ranks=(0,)).spec())
    return out


class DeviceScheduling:
    """An xdist scheduler (xdist.scheduler.protocol.Scheduling) that sends every item of device d to
    worker gw{d mod N}: one worker per device, fixed in advance, so a GPU is only touched by its worker.

    A worker that crashes hands its remaining items to the worker xdist starts in its place.
    """

    def __init__(self, config: pytest.Config, log: Any = None):
        from xdist.workermanage import parse_tx_spec_config

        self.numnodes = len(parse_tx_spec_config(config))
        self.node2collection: dict[Any, list[str]] = {}
        self.node2pending: dict[Any, list[int]] = {}
        self._started: list[Any] = []
        self._orphans: list[str] = []
        self.collection_is_completed = False
        self.log = log

    @property
    def nodes(self) -> list[Any]:
        return list(self.node2pending)

    @property
    def tests_finished(self) -> bool:
        # a worker keeps its last item until told to shut down; one left pending is running, not waiting
        return (self.collection_is_completed and not self._orphans
                and all(len(p) < 2 for p in self.node2pending.values()))

    @property
    def has_pending(self) -> bool:
        return any(self.node2pending.values())

    def add_node(self, node: Any) -> None:
        self.node2pending[node] = []

    def add_node_collection(self, node: Any, collection: Sequence[str]) -> None:
        self.node2collection[node] = list(collection)
        if len(self.node2collection) >= self.numnodes:
            self.collection_is_completed = True

    def mark_test_complete(self, node: Any, item_index: int, duration: float = 0) -> None:
        self.node2pending[node].remove(item_index)

    def mark_test_pending(self, item: str) -> None:
        raise NotImplementedError("chipcheck pins items to workers; nothing is re-queued")

    def remove_pending_tests_from_node(self, node: Any, indices: Sequence[int]) -> None:
        raise NotImplementedError("chipcheck pins items to workers; nothing is stolen")

    def remove_node(self, node: Any) -> str | None:
        pending = self.node2pending.pop(node)
        if not pending:
            return None
        collection = self.node2collection[node]
        crashed = collection[pending.pop(0)]
        self._orphans.extend(collection[i] for i in pending)
        return crashed

    @staticmethod
    def slot_of(nodeid: str, numnodes: int) -> int:
        """The worker slot of an item: its device index mod the number of workers (0 for `[all]`)."""
        m = _DEVICE_IN_NODEID.search(nodeid)
        return int(m.group(2)) % numnodes if m else 0

    def schedule(self) -> None:
        assert self.collection_is_completed
        for node in self.nodes:
            if node in self._started or node not in self.node2collection:
                continue
            collection = self.node2collection[node]
            if self._started and self._orphans:  # a replacement for a crashed worker
                want = set(self._orphans)
                self._orphans.clear()
                indices = [i for i, nid in enumerate(collection) if nid in want]
            else:
                slot = _worker_slot(node, self.numnodes)
                indices = [i for i, nid in enumerate(collection) if self.slot_of(nid, self.numnodes) == slot]
            self._started.append(node)
            self.node2pending[node] = list(indices)
            if indices:
                node.send_runtest_some(indices)
            node.shutdown()


def _worker_slot(node: Any, numnodes: int) -> int:
    gid = str(getattr(node.gateway, "id", "gw0"))
    return int(gid[2:]) % numnodes if gid.startswith("gw") and gid[2:].isdigit() else 0
