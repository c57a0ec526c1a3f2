"""Reports from typed results: the view, HTML, JUnit, the JSON schema, and reloading a run from SQLite."""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from chipcheck.fleet import reload, synthetic
from chipcheck.fleet.store import Store, StoreError
from chipcheck.reports import formats, html, json_report, junit, view
from chipcheck.reports.extras import HistoryPoint, LinkSummary, ReportExtras, Topology
from chipcheck.results import ErrorInfo, ErrorKind, RunSummary, Verdict

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def fleet():
    return synthetic.run(200, fail_fraction=0.05, seed=3)


def test_view_names_every_failure_mode_with_its_fleet_fraction(fleet):
    v = view.build(fleet)
    assert v.failing == len(fleet.failed) == 10
    names = {m.name: m for m in v.modes}
    assert {"matmul wrong: exact", "matmul wrong: consensus", "matmul slow", "matmul flaky: repeat",
            "matmul error: timeout"} <= set(names)
    wrong = names["matmul wrong: exact"]
    assert wrong.fraction == pytest.approx(len(wrong.ranks) / 200)
    assert v.modes[0].verdict is Verdict.WRONG  # the worst news first
    card = next(c for c in v.cards if c.verdict is Verdict.WRONG)
    assert card.histograms and card.histograms[0].dtype == "float32"
    slow_group = next(g for g in v.groups if g.outliers)
    assert all(r < 0.8 for _, _, r in slow_group.outliers)


def test_html_is_self_contained_and_shows_failures(fleet):
    doc = html.render(fleet)
    assert doc.startswith("<!DOCTYPE html>")
    # nothing from the network: no remote src/href/url(), no <link> or external <script src>
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", doc)
    assert "url(http" not in doc and "<link" not in doc and "<script src" not in doc
    for d in fleet.failed:
        assert f"{d.host} {d.device}" in doc
    assert 'id="failures"' in doc and 'id="throughput"' in doc and "<svg" in doc
    # link, topology and history sections only when there is data for them
    assert 'id="links"' not in doc and 'id="topology"' not in doc and "trend of" not in doc


def test_html_sections_for_links_topology_history(fleet):
    wrong = next(d for d in fleet.failed if d.verdict is Verdict.WRONG)
    links = [LinkSummary(src=f"node0000 cuda:{i}", dst=f"node0000 cuda:{j}", verdict=Verdict.PASS,
                         busbw_gbps=380.0 + i + j) for i in range(8) for j in range(i + 1, 8)]
    links.append(LinkSummary(src="node0000 cuda:0", dst="node0001 cuda:0", verdict=Verdict.SLOW, busbw_gbps=41.5,
                             reason="slow: 0.11x the median of its peers"))
    topo = Topology(levels=("rack", "node"),
                    placement={f"node000{n} cuda:{g}": (f"rack{n // 2}", f"node000{n}") for n in range(4)
                               for g in range(8)})
    hist = {wrong.uuid: [HistoryPoint(run_id=f"r{i}", started=i, verdict=Verdict.PASS, throughput_ratio=1.0 - i / 50)
                         for i in range(6)] + [HistoryPoint(run_id="r6", started=6, verdict=Verdict.WRONG)]}
    doc = html.render(fleet, ReportExtras(links=links, topology=topo, history=hist))
    assert 'id="links"' in doc and 'id="link-heatmap"' in doc and "node0000 cuda:0 ↔ node0001 cuda:0" in doc
    assert 'id="topology"' in doc and f"trend of {wrong.host} {wrong.device}" in doc
    assert "links failing" in doc


def test_html_escapes_what_devices_report(fleet):
    d = fleet.devices[0]
    p = d.probes[0]
    evil = replace(p, verdict=Verdict.ERROR, reasons=["<script>alert(1)</script></script>"])
    s = replace(fleet, devices=[replace(d, verdict=Verdict.ERROR, probes=[evil]), *fleet.devices[1:]])
    doc = html.render(s)
    assert "<script>alert(1)" not in doc
    assert "&lt;script&gt;alert(1)" in doc
    data = doc.split('<script type="application/json" id="device-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["rows"][0][8].startswith("<script>alert(1)")


def test_html_cards_are_capped_but_every_failure_is_listed(fleet):
    doc = html.render(fleet, options=html.HtmlOptions(max_cards=3))
    assert doc.count('class="card ') == 3
    assert 'id="more-failures"' in doc
    for c in view.build(fleet).cards:
        assert f'id="{c.anchor}"' in doc


def test_junit_one_testcase_per_device_and_probe(fleet):
    errors_msg = "\x1b[31mkilled\x1b[0m"
    d = fleet.devices[1]
    case = replace(d.probes[0].cases[0], verdict=Verdict.ERROR, error=ErrorInfo(kind=ErrorKind.CRASH, message=errors_msg))
    crashed = replace(d.probes[0], verdict=Verdict.ERROR, cases=[case], reasons=[errors_msg])
    s = replace(fleet, devices=[fleet.devices[0], replace(d, verdict=Verdict.ERROR, probes=[crashed]),
                                *fleet.devices[2:]])
    links = [LinkSummary(src="a", dst="b", verdict=Verdict.WRONG, reason="wrong: 3 bytes differ")]
    root = ET.fromstring(junit.render(s, ReportExtras(links=links)))
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == len(s.devices) + 1
    for suite in root.findall("testsuite"):
        tcs = suite.findall("testcase")
        assert int(suite.get("tests")) == len(tcs)
        assert int(suite.get("failures")) == sum(1 for t in tcs if t.find("failure") is not None)
        assert int(suite.get("errors")) == sum(1 for t in tcs if t.find("error") is not None)
        assert re.fullmatch(r"\d+\.\d{3}", suite.get("time"))  # Jenkins' SUREFIRE_TIME
    assert int(root.get("tests")) == len(cases)
    by_name = {(t.get("classname"), t.get("name")): t for t in cases}
    err = by_name[("chipcheck.matmul", f"{d.host} {d.device}")].find("error")
    assert err.get("type") == "crash" and "\x1b" not in err.get("message")
    wrong = next(x for x in s.devices if x.verdict is Verdict.WRONG)
    fail = by_name[("chipcheck.matmul", f"{wrong.host} {wrong.device}")].find("failure")
    assert fail.get("type") == "wrong" and "flipped bits" in fail.text
    assert by_name[("chipcheck.links", "a <-> b")].find("failure").get("type") == "wrong"


def test_documented_json_example_validates():
    text = (DOCS / "json-schema.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    assert blocks, "docs/json-schema.md must carry an example"
    schema = formats.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for b in blocks:
        jsonschema.validate(json.loads(b), schema)


def test_json_of_a_run_validates_and_bad_json_does_not(fleet):
    schema = formats.json_schema()
    doc = json.loads(json_report.render(fleet))
    jsonschema.validate(doc, schema)
    doc["devices"][0]["verdict"] = "meh"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_formats_and_cli_agree():
    from chipcheck import cli

    assert cli.FORMATS == formats.FORMATS == ("text", "json", "junit", "html", "ocp", "prom")
    with pytest.raises(formats.UnknownFormat):
        formats.render(synthetic.run(2), "pdf")


def test_reload_rebuilds_the_summary_from_sqlite(tmp_path):
    f = synthetic.fleet(24, fail_fraction=0.25, seed=5, run_id="r-abc", started=time.time())
    s, judged = synthetic.judge(f)
    store = Store(tmp_path / "r.db")
    store.begin_run(f.run_id, host="h", profile=s.profile, seed=s.seed, argv=[], config={"min_gap": 0.1})
    store.add_devices(f.run_id, f.devices.items())
    for r in f.results:
        store.add_result(r)
    store.add_judgements(f.run_id, judged)
    store.end_run(f.run_id, s.verdict)
    store.close()
    st = reload.open_existing(tmp_path / "r.db")
    try:
        again = reload.load(st, "latest")
        assert reload.load(st, "r-a").run_id == "r-abc"  # a unique prefix is enough
        with pytest.raises(reload.RunNotFound):
            reload.load(st, "nope")
    finally:
        st.close()
    assert again.verdict is s.verdict
    assert json_report.to_dict(again)["devices"] == json_report.to_dict(s)["devices"]
    assert again.groups == s.groups
    with pytest.raises(StoreError):
        reload.open_existing(tmp_path / "missing.db")


def test_throughput_reads_each_probe_on_its_own_speed_metric() -> None:
    # collectives are judged on bus bandwidth: the view must rank them on it, not on tflops_best.
    # The summary carries each probe's metric (the registry's, filled by fleet.summary.summarize)
    from dataclasses import replace

    from chipcheck.fleet import summary, synthetic
    from chipcheck.reports import view

    metric = summary.registry_speed_metrics()
    assert (metric["matmul"], metric["collectives"], metric["links"]) == ("tflops_best", "busbw_gbps_best", "")
    s = synthetic.run(16, fail_fraction=0.2, seed=1)
    assert {p.speed_metric for d in s.devices for p in d.probes} == {"tflops_best"}
    _, before = view.throughput(s)

    def as_probe(s: RunSummary, probe: str, fix_metric: bool = True) -> RunSummary:
        return replace(s, devices=[replace(d, probes=[replace(
            p, probe=probe, speed_metric=metric[probe] if fix_metric else p.speed_metric, metrics={
                k.replace(":tflops_best", ":busbw_gbps_best"): v for k, v in p.metrics.items()
                if k.endswith(":tflops_best")}) for p in d.probes]) for d in s.devices])

    as_bus = as_probe(s, "collectives")
    groups, after = view.throughput(as_bus)
    assert after == before and len(after) == 16
    assert all(g.median_tflops == {} for g in groups)  # bus GB/s is not TFLOP/s
    # a caller's own table wins over what the summary carries
    stale = as_probe(s, "collectives", fix_metric=False)
    assert view.throughput(stale)[1] == {}
    assert view.throughput(stale, metric)[1] == before
    bare = as_probe(s, "links")
    assert view.throughput(bare) == ([], {})  # links are judged per link, never per device
    assert view.throughput(bare, metric) == ([], {})
