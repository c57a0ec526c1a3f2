"""One run's verdicts: every judge applied to its results, the same way on every path.

`fleet_verdicts` is the one place a run is judged: at the end of a live run (fleet.runner, the
torchrun and JAX paths through it), when a stored run is reloaded (fleet.reload), when sweep
shards are ingested (fleet.ingest) and by the pytest plugin. Each rule lives in its own module
of this package; this one only puts them in order and hands their findings to the blame rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...results import ConsensusGroup, DeviceInfo, Judgement, LinksSummary, ProbeResult, Verdict
from . import baselines as bl
from . import blame, injected, speed, throttle
from . import own_history as oh
from .consensus import consensus
from .second_opinion import Culprit, Finding, second_opinion_findings

if TYPE_CHECKING:
    from ..store import Store


@dataclass(frozen=True, slots=True, kw_only=True)
class LibraryFindings:
    """What the independent-GEMM probe and the fp64 references say about software, not any one chip."""

    findings: list[str]
    exonerate: set[tuple[int, str, str]]
    """(rank, probe, case) whose local `wrong` is the library's doing, not the chip's."""
    fleet_verdict: Verdict
    """WRONG when a library is wrong on every device: still a wrong result for the fleet's users."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetVerdicts:
    """Everything the judges decide about one run's results, before it is folded per device."""

    judgements: list[Judgement]
    groups: list[ConsensusGroup]
    links: LinksSummary | None
    library: LibraryFindings
    unfired: list[str]
    """Injected faults that hit no kernel call of the run (fleet.judge.injected)."""

    @property
    def findings(self) -> list[str]:
        """The run's findings about no one device: software's, then injected faults that hit nothing."""
        return self.library.findings + self.unfired


def speed_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Each probe's speed metric and the retest kernel that confirms its slow suspects (the registry's)."""
    from ...probes import base

    reg = base.registry()
    return {n: c.speed_metric for n, c in reg.items()}, {n: c.speed_kernel for n, c in reg.items()}


def collective_probes() -> frozenset[str]:
    from ...probes import base

    return frozenset(n for n, cls in base.registry().items() if cls.collective)


def fleet_verdicts(devs: dict[int, DeviceInfo], results: list[ProbeResult], *, min_gap: float,
                   declared: dict[int, tuple[str, ...]] | None = None, baselines: bl.BaselineTable | None = None,
                   own: list[Judgement] | None = None, judged: list[Judgement] | None = None) -> FleetVerdicts:
    """Consensus, speed (peers, retest, throttle, baselines), links, second opinion, then blame.

    `judged`: the judgements stored for a run that was judged when it ended; they are the record, and
    only the consensus groups and library findings are recounted from the results. `own`: each device
    against its own history (it needs the store: `own_history`); a drop this run's retest cleared is
    only noted."""
    from .. import links_run

    cons, groups = consensus(results, collective_probes())
    chips, library = second_opinion_findings(results)
    lib = library_findings(results, library)
    unfired = injected.unfired(results)
    if judged is not None:
        return FleetVerdicts(judgements=judged, groups=groups, links=None, library=lib, unfired=unfired)
    slow = speed.judge(results, speed.SpeedPolicy(min_gap=min_gap), *speed_tables())
    linked = links_run.analyze(results, devs, declared)
    link_summary, link_js = linked if linked else (None, [])
    if link_summary is not None:
        link_summary, link_js = speed.confirm_links(link_summary, link_js, results,
                                                    {r: d.host for r, d in devs.items()},
                                                    speed.SpeedPolicy(min_gap=links_run.policy_for(devs).min_gap))
    table = baselines if baselines is not None else bl.load()
    judgements = (cons + slow + link_js + chips + throttle.judgements(results, min_gap)
                  + bl.baseline_judgements(results, devs, table) + oh.withdraw_retested(own or [], results, slow))
    judgements += blame.resolve(results, judgements, groups, lib.exonerate)
    return FleetVerdicts(judgements=judgements, groups=groups, links=link_summary, library=lib, unfired=unfired)


def library_findings(results: list[ProbeResult], library: list[tuple[str, str, Finding]]) -> LibraryFindings:
    """The library-vs-chip findings of a run: the independent GEMM's (`library`, from
    second_opinion_findings), and tolerance oracles that fire identically on every device
    (fleet.judge.blame.systematic)."""
    findings = [f"xgemm {case} (fingerprint {fp}): the library GEMM and the independent kernel disagree on "
                f"{'every' if f.culprit is Culprit.LIBRARY else 'the only'} device {list(f.ranks)}: "
                f"{'suspect the library (cuBLAS/BLAS), not the chips' if f.culprit is Culprit.LIBRARY else 'no peer to compare'}"
                for fp, case, f in library]
    blamed = [(case, f) for _, case, f in library if f.culprit is Culprit.LIBRARY]
    same = blame.systematic(results)
    return LibraryFindings(findings=findings + same.findings,
                           exonerate={(r, "xgemm", case) for case, f in blamed for r in f.ranks} | same.exonerate,
                           fleet_verdict=Verdict.WRONG if blamed else Verdict.PASS)


def own_history(store: Store, devs: dict[int, DeviceInfo], results: list[ProbeResult], run_id: str,
                now: float) -> list[Judgement]:
    """`slow` for devices far below their own past speed (fleet.judge.own_history), per speed key; not on
    a kernel a device's host owns (speed.HOST_SHARED: a CPU device's copy speed swings with its host's)."""
    keys = {k for (_, k) in bl.best_speeds(bl.speed_samples(results))}
    kernel = speed_tables()[1]
    out: list[Judgement] = []
    for key in sorted(keys, key=lambda k: (k.probe, k.family)):
        current = {r: s for r, s in oh.run_speeds(results, key).items()
                   if r in devs and not speed.host_owned(devs[r].kind.value, kernel.get(key.probe, ""))}
        past = {r: oh.speed_history(store, devs[r].uuid, key, now=now, exclude_run=run_id, like=s)
                for r, s in current.items()}
        out += oh.history_judgements({r: s.value for r, s in current.items()}, past, probe=key.probe,
                                     case=key.family, unit=key.unit)
    return out


def retest_options(results: list[ProbeResult], devs: dict[int, DeviceInfo], min_gap: float) -> dict[str, str]:
    """The retest probe's options for this run's next retest stage; {} when nothing is left to retest.

    First stage (the run has no retest yet): every speed suspect (devices and links). Second: the
    device suspects whose first retest was inconclusive, with more rounds (fleet.judge.speed)."""
    from .. import links_run

    if len(devs) < 2:
        return {}
    policy = speed.SpeedPolicy(min_gap=min_gap)
    found = speed.suspects(results, policy, *speed_tables())
    if any(r.probe == speed.RETEST for r in results):
        return speed.extension_options(results, found, policy)
    options = speed.retest_options(found)
    linked = links_run.analyze(results, devs)
    if linked is not None:
        options.update(speed.link_retest_option(speed.link_suspects(linked[0], {r: d.host for r, d in devs.items()})))
    return options
