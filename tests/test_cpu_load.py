"""probes/cpu_load.py: how busy the host was over some spans, from /proc/stat."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chipcheck.probes.cpu_load import HostBusy, busy_s


def test_the_busy_share_is_the_busy_time_over_the_time_offered(tmp_path: Path) -> None:
    tick = 1 / os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text("cpu  30 0 10 100 0 0 0 0 0 0\ncpu0 10 0 5 50 0 0 0 0 0 0\ncpu1 20 0 5 50 7 0 0 0 0 0\n")
    assert busy_s(stat) == (pytest.approx(40 * tick), 2)  # user nice system irq softirq steal; not idle, iowait
    host = HostBusy(stat)
    t0 = time.perf_counter()
    with host:
        stat.write_text("cpu  0\ncpu0 10 0 5 50 0 0 0 0 0 0\ncpu1 20 0 5 50 7 0 0 3 0 0\n")  # 3 ticks of steal
    wall = time.perf_counter() - t0
    assert host.busy_s == pytest.approx(3 * tick)
    assert 0 < host.offered_s <= 2 * wall and host.share == pytest.approx(host.busy_s / host.offered_s)
    assert busy_s(tmp_path / "missing") is None and HostBusy(tmp_path / "missing").share is None


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_process_spinning_on_one_core_shows_in_the_hosts_share() -> None:
    cpus = os.cpu_count() or 1
    tenant = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        time.sleep(0.3)  # it is running
        host = HostBusy()
        for _ in range(5):
            with host:
                time.sleep(0.1)  # this process idle: what is busy is the others'
        assert host.share is not None and host.share >= 0.8 / cpus, host.share
    finally:
        tenant.kill()
        tenant.wait()


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_tenant_on_this_process_core_shows_as_its_foreign_share() -> None:
    core = max(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    tenant = subprocess.Popen([sys.executable, "-c", f"import os, time\nos.sched_setaffinity(0, {{{core}}})\n"
                               "t = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        os.sched_setaffinity(0, {core})
        time.sleep(0.3)  # it is running
        host = HostBusy()
        for _ in range(10):
            with host:
                t = time.perf_counter()
                while time.perf_counter() - t < 0.05:
                    pass
        assert host.cores == frozenset({core})
        assert host.foreign_share is not None and host.foreign_share > 0.25, host.foreign_share  # about half
    finally:
        os.sched_setaffinity(0, before)
        tenant.kill()
        tenant.wait()
