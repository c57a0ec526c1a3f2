"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian, in a tmp dir.

Everything (config, munge key and socket, state, spool, logs) lives in one folder; clients find the
cluster through $SLURM_CONF. The daemons run in the foreground (-D) as children of the test, as
root (CI runs as root), with no cgroups (proctrack/linuxproc, task/none), so they work inside a
container. `why_not()` says why no cluster can be started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


def why_not() -> str:
    """Empty when a cluster can be started here; else the reason to skip."""
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root (CI runs as root)"
    missing = [n for n in (*DAEMONS, "sbatch", "sinfo", "scontrol") if not _which(n)]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    return ""



@dataclass
class SlurmCluster:
    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = 2
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client (sbatch, sinfo, chipcheck) needs to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        r.chmod(0o755)  # munged wants its socket's folders searchable by everyone
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld, slurmd = free_port(), free_port()
        self.conf.write_text(f"""\
ClusterName=chipcheck-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 (lives as long as the daemon)
        self.procs.append(subprocess.Popen([_which(name) or name, *args], env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def up(self, timeout_s: float = 60.0) -> SlurmCluster:
        self._write_config()
        m = self.root / "munge"
        self._start("munged", "-F", "--force", f"--key-file={m / 'munge.key'}", f"--socket={m / 'munge.socket'}",
                    f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}")
        self._wait(lambda: (m / "munge.socket").exists(), 15, "munged never opened its socket")
        self._start("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._start("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(self.idle, timeout_s, "the node never became idle")
        return self

    def idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True,
                           timeout=10)
        return p.returncode == 0 and p.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def _wait(self, ok: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{what}: a daemon exited ({dead[0].args[0]}, code {dead[0].returncode}):\n"
                                   f"{self.logs()}")
            if ok():  # type: ignore[operator]
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout_s:g}s:\n{self.logs()}")

    def node_state(self) -> tuple[str, str]:
        """(state, reason) of the node, from scontrol."""
        p = subprocess.run(["scontrol", "show", "node", self.node], env=self.env, capture_output=True, text=True,
                           timeout=10)
        fields = dict(w.split("=", 1) for w in p.stdout.replace("\n", " ").split(" ") if "=" in w)
        reason = p.stdout.split("Reason=", 1)[1].split("\n")[0] if "Reason=" in p.stdout else ""
        return fields.get("State", ""), reason

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    def down(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
