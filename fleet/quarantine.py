"""Take failing hosts out of service: the commands per scheduler, with a reason per host.

The list is built from one judged run (every failing device probe and link, by failure code) plus
the history's findings (lemons, flaky turns, slowdowns). A host is drained when any of its codes'
actions needs it out of service (drain, replace the chip, reseat the link); codes that only ask
for a retest or monitoring are listed as comments. Commands are printed; `apply` runs them, and
only when the user asked for it (`--apply`): draining nodes is never a side effect.
"""

from __future__ import annotations

import enum
import re
import shlex
import subprocess
from collections import defaultdict
from dataclasses import dataclass

from .. import failures
from ..failures import FailureCode
from ..results import RunSummary
from . import records
from .history import TrendReport

TAINT_KEY = "chipcheck.io/quarantine"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REASON_MAX = 200  # Slurm keeps the reason in one line of `sinfo -R`; k8s annotations allow far more


class Format(enum.StrEnum):
    SLURM = "slurm"
    K8S = "k8s"
    HOSTS = "hosts"


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One reason to act on one host."""

    host: str
    code: FailureCode
    subject: str
    """What failed: `cuda:3 matmul`, a link, a device's history."""
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPlan:
    host: str
    entries: tuple[Entry, ...]

    @property
    def worst(self) -> FailureCode:
        code = failures.worst([e.code for e in self.entries])
        assert code is not None
        return code

    @property
    def out_of_service(self) -> bool:
        return any(e.code.action.out_of_service for e in self.entries)

    def reason(self, run_id: str) -> str:
        """`chipcheck: CC-SDC-001 replace_chip cuda:3 matmul; ... (run R)`, one line without quotes."""
        parts = list(dict.fromkeys(f"{e.code.code} {e.code.action.value} {e.subject}"
                                   for e in sorted(self.entries, key=lambda e: -e.code.severity)))
        text = "; ".join(parts)
        tail = f" (run {run_id})" if run_id else ""
        if len(text) + len(tail) > REASON_MAX:
            text = text[:REASON_MAX - len(tail) - 3] + "..."
        return _CONTROL.sub(" ", ("chipcheck: " + text + tail).replace('"', "'"))


def collect(summary: RunSummary | None, history: TrendReport | None = None) -> list[HostPlan]:
    """Every host with a failure code, worst first (then by name)."""
    by_host: dict[str, list[Entry]] = defaultdict(list)
    if summary is not None:
        for d in summary.devices:
            for p in d.probes:
                code = failures.for_probe(p)
                if code is not None:
                    by_host[d.host].append(Entry(host=d.host, code=code, subject=f"{d.device} {p.probe}"))
        if summary.links is not None:
            where = {d.rank: (d.host, d.device) for d in summary.devices}
            for x in summary.links.links:
                code = failures.for_link(x.verdict)
                if code is None:
                    continue
                (sh, sd), (dh, dd) = where.get(x.src, ("?", "?")), where.get(x.dst, ("?", "?"))
                for host in dict.fromkeys((sh, dh)):  # a bad cable takes both of its ends out of jobs
                    by_host[host].append(Entry(host=host, code=code, subject=f"link {sh} {sd} -> {dh} {dd}",
                                               detail=x.reason))
    if history is not None:
        for f in history.findings:
            for host in dict.fromkeys(f.hosts):
                by_host[host].append(Entry(host=host, code=f.code, subject=f"{f.device} history", detail=f.detail))
    plans = [HostPlan(host=h, entries=tuple(es)) for h, es in by_host.items()]
    return sorted(plans, key=lambda p: (-p.worst.severity, p.host))


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    host: str
    argv: tuple[str, ...]
    display: str
    """The command as a shell line (what is printed)."""


def refused(plans: list[HostPlan], fmt: Format) -> list[tuple[str, str]]:
    """(host, why) for every host whose name must never reach `fmt`'s command or record."""
    check = records.k8s_node_problem if fmt is Format.K8S else records.host_problem
    return [(p.host, why) for p in plans if (why := check(p.host))]


def commands(plans: list[HostPlan], fmt: Format, run_id: str = "") -> tuple[list[Command], list[str]]:
    """(commands to take the out-of-service hosts out, comment lines for hosts that only need a retest)."""
    cmds: list[Command] = []
    notes: list[str] = []
    bad = dict(refused(plans, fmt))
    for p in plans:
        if p.host in bad:  # never an argument, never a record: `--all` would cordon every node, a newline forge a line
            notes.append(f"# refused: {_CONTROL.sub('?', bad[p.host])}; not drained "
                         f"(fix the host name and judge again)")
            continue
        reason = p.reason(run_id)
        if not p.out_of_service:
            notes.append(f"# {p.host}: not drained ({p.worst.action.value}): {reason}")
            continue
        if fmt is Format.SLURM:  # scontrol takes no `--`; the host is inside `NodeName=`, never an option
            argv = ("scontrol", "update", f"NodeName={p.host}", "State=DRAIN", f"Reason={reason}")
            cmds.append(Command(host=p.host, argv=argv,
                                display=f'scontrol update NodeName={shlex.quote(p.host)} State=DRAIN '
                                        f'Reason="{_dq(reason)}"'))
        elif fmt is Format.K8S:  # flags first, then `--`: what follows is a node name whatever it looks like
            host = shlex.quote(p.host)
            cmds.append(Command(host=p.host, argv=("kubectl", "cordon", "--", p.host),
                                display=f"kubectl cordon -- {host}"))
            taint = f"{TAINT_KEY}={p.worst.code}:NoSchedule"
            cmds.append(Command(host=p.host, argv=("kubectl", "taint", "nodes", "--overwrite", "--", p.host, taint),
                                display=f"kubectl taint nodes --overwrite -- {host} {taint}"))
            note = f"{TAINT_KEY}-reason={reason}"
            cmds.append(Command(host=p.host, argv=("kubectl", "annotate", "node", "--overwrite", "--", p.host, note),
                                display=f'kubectl annotate node --overwrite -- {host} {TAINT_KEY}-reason="{_dq(reason)}"'))
        else:
            line = f"{p.host}\t{','.join(dict.fromkeys(e.code.code for e in p.entries))}\t{p.worst.action.value}\t{reason}"
            cmds.append(Command(host=p.host, argv=(), display=line))
    return cmds, notes


def _dq(text: str) -> str:
    """Escape for inside double quotes in a POSIX shell."""
    return "".join("\\" + c if c in '"$`\\' else c for c in text)


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    command: Command
    returncode: int
    output: str


def apply(cmds: list[Command], timeout_s: float = 60.0) -> list[Applied]:
    """Run the commands (no shell: argv as built); a missing tool or a timeout is a failed command."""
    out = []
    for c in cmds:
        if not c.argv:
            continue
        try:
            p = subprocess.run(list(c.argv), capture_output=True, text=True, timeout=timeout_s)
            out.append(Applied(command=c, returncode=p.returncode, output=(p.stdout + p.stderr).strip()))
        except (OSError, subprocess.TimeoutExpired) as e:
            out.append(Applied(command=c, returncode=127, output=str(e)))
    return out
