"""Real test hosts on one machine: network namespaces on a bridge, one chipcheck worker per host.

A "switch" namespace holds a bridge; every host namespace gets a veth pair whose other end is
plugged into the bridge, with a link-local address (169.254.77.N) so no traffic can leave the
machine. `rate_limit(host, mbit)` puts a token-bucket filter (tc tbf) on both ends of that
host's cable, so everything it sends or receives crawls. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "169.254.77"


def why_not() -> str:
    """Empty when namespaces can be made here; else the reason to skip."""
    if os.geteuid() != 0:
        return "network-namespace test hosts need root (CI runs as root)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    probe = f"ccprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _sh(*args: str) -> None:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Cluster:
    hosts: int
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, i: int) -> str:
        return f"cc{self.tag}h{i}"

    @property
    def switch(self) -> str:
        return f"cc{self.tag}sw"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def up(self) -> Cluster:
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        _sh("ip", "-n", self.switch, "link", "set", "lo", "up")
        for i in range(self.hosts):
            ns, a, b = self.ns(i), f"c{self.tag}a{i}", f"c{self.tag}b{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            _sh("ip", "link", "set", a, "netns", ns)
            _sh("ip", "link", "set", b, "netns", self.switch)
            _sh("ip", "-n", ns, "link", "set", a, "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", self.switch, "link", "set", b, "master", "br0")
            _sh("ip", "-n", self.switch, "link", "set", b, "up")
        return self

    def rate_limit(self, i: int, mbit: int) -> None:
        """Throttle host i's cable in both directions (tbf: netem is not available here)."""
        spec = ["tbf", "rate", f"{mbit}mbit", "burst", "64kb", "latency", "400ms"]
        _sh("ip", "netns", "exec", self.ns(i), "tc", "qdisc", "add", "dev", "eth0", "root", *spec)
        _sh("ip", "netns", "exec", self.switch, "tc", "qdisc", "add", "dev", f"c{self.tag}b{i}", "root", *spec)

    def start(self, i: int, args: list[str], port: int, world: int | None = None, tmp: Path | None = None,
              extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`python -m chipcheck.worker ARGS` as rank i inside host i, as torchrun would start it."""
        env = {**os.environ, "RANK": str(i), "WORLD_SIZE": str(world or self.hosts), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": self.addr(0), "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "eth0", "CHIPCHECK_HOSTNAME": f"host{i}", **(extra_env or {})}
        log = open((tmp or Path("/tmp")) / f"host{i}.log", "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(i), sys.executable, "-m", "chipcheck.worker", *args],
                             env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        return p

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for i in range(self.hosts):
            subprocess.run(["ip", "netns", "del", self.ns(i)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
