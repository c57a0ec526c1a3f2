"""Ingest trusts nothing (issue 20, item 7): bad lines are skipped and named, good lines of the same
shard kept, binary files skipped, and a store poisoned before this check still reports."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chipcheck.fleet import ingest, records, synthetic
from chipcheck.fleet.store import Store

RUN = "20261125T010000-abcdef"

BAD_FIELDS = [
    ("run_id", 7), ("run_id", None), ("rank", "3"), ("rank", 10**30), ("rank", -1), ("rank", True),
    ("started", float("nan")), ("started", "now"), ("metrics", "fast"), ("metrics", {"tflops": "1"}),
    ("metrics", {"tflops": float("inf")}), ("verdict", "great"), ("verdict", ["pass"]), ("seed", 2**70),
    ("host", "--all"), ("host", "node1\nnode9"), ("host", ""), ("probe", "mat\tmul"), ("error", "boom"),
    ("error", {"kind": "oops", "message": "x"}), ("mismatches", [{"oracle": "exact"}]), ("links", "x"),
    ("params", []), ("repeats", 1.5), ("repeat_hashes", "abc"), ("repeat_hashes", [1, 2]), ("repeat_hashes", [""]),
]


def _lines(n: int = 4) -> list[str]:
    f = synthetic.fleet(n, fail_fraction=0.0, seed=3, run_id=RUN)
    return [r.to_json() for r in f.results]


def _bad(line: str, key: str, value: object) -> str:
    d = json.loads(line)
    d[key] = value
    return json.dumps(d)


def test_each_bad_field_is_skipped_and_named_the_good_lines_kept(tmp_path: Path) -> None:
    good = _lines()
    shard = tmp_path / "s.jsonl"
    lines = []
    for i, (key, value) in enumerate(BAD_FIELDS):
        lines.append(good[i % len(good)] if i < len(good) else _bad(good[0], "case", f"c{i}"))
        lines.append(_bad(good[0], key, value))
    body = [x for x in lines]
    shard.write_text("\n".join(body) + "\n")
    kept = {json.loads(x)["case"] for x in body[0::2]}
    db = tmp_path / "r.db"
    p = run_cli("ingest", "--db", str(db), str(shard))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert f"{len(BAD_FIELDS)} unreadable lines" in p.stdout
    warned = [x for x in p.stderr.splitlines() if x.startswith("chipcheck: warning: ")]
    assert warned[0].startswith(f"chipcheck: warning: {shard}:2: ")  # file:line of the first bad line
    assert "--all" in p.stderr and "not a valid host name" in p.stderr
    with sqlite3.connect(db) as c:
        got = {r for (r,) in c.execute("SELECT DISTINCT case_name FROM results")}
        hosts = {r for (r,) in c.execute("SELECT DISTINCT host FROM results")}
    assert got == kept and all(records.host_problem(h) is None for h in hosts)
    p = run_cli("report", "--db", str(db), "latest")
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr


def test_a_binary_file_is_skipped_the_other_shards_read(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(_lines(2)) + "\n")
    (d / "b.jsonl").write_bytes(bytes(range(256)) * 64)
    (d / "c.jsonl").write_bytes(b"\xff\xfe" + _lines(2)[0].encode() + b"\n")  # not UTF-8: one bad line
    p = run_cli("ingest", "--db", str(tmp_path / "r.db"), str(d))
    assert p.returncode == 0, p.stderr
    assert f"{d / 'b.jsonl'}: skipped: a binary file" in p.stderr
    assert "1 unreadable lines, 1 unreadable files skipped" in p.stdout
    assert p.stdout.startswith(f"ingested {len(_lines(2))} results from 2 shards")


def test_a_store_poisoned_by_an_old_ingest_still_reports(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    shard = tmp_path / "s.jsonl"
    shard.write_text("\n".join(_lines()) + "\n")
    assert run_cli("ingest", "--db", str(db), str(shard)).returncode == 0
    with sqlite3.connect(db) as c:  # what the trusting ingest used to store
        (body,) = c.execute("SELECT body FROM results LIMIT 1").fetchone()
        c.execute("UPDATE results SET body=? WHERE id=1", (_bad(body, "metrics", "fast"),))
        c.execute("UPDATE results SET body=? WHERE id=2", ("{not json",))
        c.execute("UPDATE judgements SET metrics='\"x\"'")
    c.close()
    p = run_cli("report", "--db", str(db), "latest")
    assert "Traceback" not in p.stderr and p.returncode in (0, 1), p.stderr
    assert "stored rows of run" in p.stdout and "could not be read and were left out" in p.stdout
    p = run_cli("report", "--db", str(db), "latest", "--format", "html", "-o", str(tmp_path / "r.html"))
    assert "Traceback" not in p.stderr and p.returncode in (0, 1), p.stderr


# ---- fuzz: generated malformed lines never crash ingest, every valid line is kept ----------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3),
                           max_leaves=6)
GOOD = _lines(4)
KEYS = sorted(json.loads(GOOD[0]))


@st.composite
def shard_line(draw: st.DrawFn) -> tuple[str, bool]:
    """(line, whether it is a valid result that must be kept)."""
    i = draw(st.integers(0, len(GOOD) - 1))
    kind = draw(st.sampled_from(["good", "field", "known_bad", "drop", "garbage", "torn"]))
    base = json.loads(GOOD[i])
    base["started"] = float(draw(st.integers(1, 10**6)))  # distinct results, not duplicates
    if kind == "good":
        return json.dumps(base), True
    if kind == "known_bad":
        key, value = draw(st.sampled_from(BAD_FIELDS))
        base[key] = value
        return json.dumps(base), False
    if kind == "drop":
        del base[draw(st.sampled_from(["run_id", "host", "rank", "verdict", "seed", "probe"]))]
        return json.dumps(base), False
    if kind == "garbage":
        return draw(st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t)), False
    if kind == "torn":
        text = json.dumps(base)
        return text[: draw(st.integers(1, len(text) - 1))], False
    base[draw(st.sampled_from(KEYS))] = draw(json_values)  # any value in any field: may still be valid
    try:
        records.parse_result(json.loads(json.dumps(base)))
        valid = True
    except records.BadRecord:
        valid = False
    return json.dumps(base), valid


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(shard_line(), min_size=1, max_size=12))
def test_fuzz_ingest_never_crashes_and_keeps_every_valid_line(tmp_path: Path, lines: list[tuple[str, bool]]) -> None:
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    (d / "s.jsonl").write_text("\n".join(text for text, _ in lines) + "\n")
    want = set()
    for text, valid in lines:
        if valid:
            r = records.parse_line(text)
            want.add((r.run_id, r.rank, r.probe, r.case, r.started))
    store = Store(d / "r.db")
    try:
        rep = ingest.ingest(store, [str(d / "s.jsonl")])
        got = set(store.conn.execute("SELECT run_id, rank, probe, case_name, started FROM results"))
        assert got == want
        assert rep.bad_lines == sum(1 for text, valid in lines if not valid and text.strip())
        for run in store.runs():  # whatever went in reads back
            store.results(run.run_id)
            store.judgements(run.run_id)
        assert store.skipped_rows == 0
    finally:
        store.close()


def test_a_shard_with_a_zero_filled_tail_keeps_its_results(tmp_path: Path) -> None:
    """A node that lost power mid-append can leave NUL bytes after its last record: the shard is
    still text, its results are kept and the NUL line is counted bad (found by the fuzz test above:
    one NUL line made the whole shard a "binary file")."""
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_bytes(("\n".join(_lines(2)) + "\n").encode() + b"\0" * 4096 + b"\n")
    store = Store(tmp_path / "r.db")
    try:
        rep = ingest.ingest(store, [str(d)])
        assert (rep.shards, rep.added, rep.bad_lines, rep.bad_files) == (1, len(_lines(2)), 1, 0), rep
    finally:
        store.close()
