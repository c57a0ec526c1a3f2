"""Links between real test hosts: network namespaces, one worker per host over gloo, tc-throttled cables.

Each host runs `python -m chipcheck.worker links` as torchrun would start it (RANK, WORLD_SIZE,
MASTER_ADDR on host 0); rank 0 gathers, judges and writes --json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from netns import Cluster, why_not

REASON = why_not()
# Link speed is judged here: these run alone, after the parallel tests (scripts/test.sh).
pytestmark = [pytest.mark.skipif(bool(REASON), reason=REASON or "ok"), pytest.mark.timing]


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Cluster:
    c = Cluster(hosts=getattr(request, "param", 4)).up()
    yield c
    c.down()


def _sweep(c: Cluster, tmp: Path, *extra: str, world: int | None = None, timeout: float = 240) -> tuple[int, dict]:
    port = random.randint(20000, 40000)
    out = tmp / "links.json"
    args = ["links", "--devices", "cpu", "--db", str(tmp / "r.db"), "--json", str(out), "--local-dir",
            str(tmp / "shards"), "-q", "--timeout", "60", *extra]
    procs = [c.start(i, args, port, world=world, tmp=tmp) for i in range(c.hosts)]
    codes = [p.wait(timeout=timeout) for p in procs]
    logs = "\n".join((tmp / f"host{i}.log").read_text()[-2000:] for i in range(c.hosts))
    assert out.exists(), logs
    return codes[0], json.loads(out.read_text())


def _link(data: dict, src: int, dst: int) -> dict:
    return next(x for x in data["links"] if x["src"] == src and x["dst"] == dst)


def test_clean_hosts_pass_and_are_grouped_by_host(cluster: Cluster, tmp_path: Path) -> None:
    code, data = _sweep(cluster, tmp_path)
    assert code == 0, data["links"]
    assert {d["host"] for d in data["devices"]} == {"host0", "host1", "host2", "host3"}
    assert len(data["links"]) == 12 and all(x["verdict"] == "pass" for x in data["links"])
    assert all(x["gbps"] and x["gbps"] > 0 and x["latency_us"] > 0 for x in data["links"])
    assert data["link_sweep"]["rounds"] == 3  # round-robin: N-1 rounds of disjoint pairs


def test_a_throttled_host_is_slow_and_no_other(cluster: Cluster, tmp_path: Path) -> None:
    cluster.rate_limit(2, mbit=40)
    code, data = _sweep(cluster, tmp_path)
    assert code == 1
    verdicts = {d["rank"]: d["verdict"] for d in data["devices"]}
    assert verdicts == {0: "pass", 1: "pass", 2: "slow", 3: "pass"}, data["links"]
    slow = {(x["src"], x["dst"]) for x in data["links"] if x["verdict"] == "slow"}
    assert slow and all(2 in pair for pair in slow)
    assert "endpoint 2" in _link(data, 2, 0)["reason"]


def test_a_corrupting_sender_on_one_link_is_a_wrong_link(cluster: Cluster, tmp_path: Path) -> None:
    code, data = _sweep(cluster, tmp_path, "--inject", "bitflip:rank=1,bit=9,op=send,peer=3,probe=links")
    assert code == 1
    bad = [(x["src"], x["dst"]) for x in data["links"] if x["verdict"] == "wrong"]
    assert bad == [(1, 3)]
    assert _link(data, 1, 3)["bad_bytes"] > 0
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "pass", 2: "pass", 3: "pass"}


def test_a_chip_corrupting_everything_it_sends_is_wrong_not_its_peers(cluster: Cluster, tmp_path: Path) -> None:
    code, data = _sweep(cluster, tmp_path, "--inject", "bitflip:rank=2,bit=9,op=send,probe=links")
    assert code == 1
    assert {d["rank"]: d["verdict"] for d in data["devices"]} == {0: "pass", 1: "pass", 2: "wrong", 3: "pass"}


@pytest.mark.parametrize("cluster", [3], indirect=True)
def test_a_host_that_never_joins_is_named(cluster: Cluster, tmp_path: Path) -> None:
    port = random.randint(20000, 40000)
    out = tmp_path / "links.json"
    args = ["links", "--devices", "cpu", "--db", str(tmp_path / "r.db"), "--json", str(out), "-q", "--timeout", "8",
            "--local-dir", str(tmp_path / "shards")]
    procs = [cluster.start(i, args, port, tmp=tmp_path) for i in (0, 1)]  # host 2 never starts
    assert procs[0].wait(timeout=120) == 1
    data = json.loads(out.read_text())
    err = data["devices"][2]["probes"][0]["details"]["cases"][0]["error"]
    assert err["kind"] == "timeout" and "rank(s) [2] never joined" in err["message"]
