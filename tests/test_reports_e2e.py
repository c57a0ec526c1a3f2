"""End to end: a real run with an injected fault -> every report format; `chipcheck report` from SQLite;
the HTML opened in a real headless Chromium (Debian's package), checked and screenshotted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import run_cli

from chipcheck.reports import formats

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 3-device run in which rank 2 flips bit 20: its reports, written by `chipcheck run`."""
    d = tmp_path_factory.mktemp("run")
    p = run_cli("run", "--devices", "cpu:3", "--probes", "matmul", "--db", str(d / "results.db"), "-q",
                "--min-gap", "0.9", "--inject", "bitflip:rank=2,bit=20", "--json", str(d / "run.json"),
                "--report", f"html={d / 'run.html'}", "--report", f"junit={d / 'run.xml'}")
    assert p.returncode == 1, p.stdout + p.stderr
    return d


def test_run_writes_every_format(faulty_run: Path) -> None:
    doc = json.loads((faulty_run / "run.json").read_text())
    jsonschema.validate(doc, formats.json_schema())
    assert next(d for d in doc["devices"] if d["rank"] == 2)["verdict"] == "wrong"
    root = ET.parse(faulty_run / "run.xml").getroot()
    failed = [tc.get("name") for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert any(name.endswith("cpu:2") for name in failed)
    assert "flipped bits [20]" in next(tc.find("failure").text for tc in root.iter("testcase")
                                       if tc.get("name").endswith("cpu:2"))
    assert (faulty_run / "run.html").read_text().startswith("<!DOCTYPE html>")


def test_report_command_renders_the_stored_run(faulty_run: Path, tmp_path: Path) -> None:
    db = str(faulty_run / "results.db")
    p = run_cli("report", "latest", "--db", db, "--format", "json", "-o", str(tmp_path / "again.json"))
    assert p.returncode == 1, p.stderr  # exits like `chipcheck run`: a device failed
    again = json.loads((tmp_path / "again.json").read_text())
    first = json.loads((faulty_run / "run.json").read_text())
    assert again["devices"] == first["devices"] and again["consensus"] == first["consensus"]
    p = run_cli("report", first["run_id"][:12], "--db", db, "--format", "text")
    assert "WRONG" in p.stdout and p.returncode == 1


@pytest.mark.parametrize("case", ["bad-id", "missing-store", "corrupt-store", "bad-format", "bad-report-spec"])
def test_report_errors_are_one_line_exit_2(case: str, faulty_run: Path, tmp_path: Path) -> None:
    db = str(faulty_run / "results.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    args = {"bad-id": ["report", "20990101", "--db", db],
            "missing-store": ["report", "--db", str(tmp_path / "none.db")],
            "corrupt-store": ["report", "--db", str(bad)],
            "bad-format": ["report", "--db", db, "--format", "pdf"],
            "bad-report-spec": ["run", "--devices", "cpu:1", "--db", db, "--report", "pdf=x.pdf"]}[case]
    p = run_cli(*args)
    assert p.returncode == 2
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 or case == "bad-format", p.stderr
    assert not (tmp_path / "none.db").exists()  # reading a report never creates a store


class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def js(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")


@pytest.fixture
def chromium(tmp_path: Path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install chromium); .ci/run installs it")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--window-size=1300,1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start-up"
            assert time.monotonic() < end, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        yield cdp
        cdp.ws.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_html_report_in_a_real_browser(faulty_run: Path, chromium: CDP, tmp_path: Path) -> None:
    page = faulty_run / "run.html"
    for domain in ("Runtime", "Log", "Network", "Page"):
        chromium.call(f"{domain}.enable")
    chromium.call("Page.navigate", url=page.as_uri())
    chromium.wait_for("Page.loadEventFired")
    # the failing device is in the headline, has a card, and is in the (script-rendered) table
    assert chromium.js("document.getElementById('verdict').textContent").startswith("WRONG")
    assert chromium.js("document.querySelectorAll('.card.wrong[data-rank=\"2\"]').length") == 1
    assert chromium.js("document.querySelectorAll('#devices tbody tr').length") == 3
    chromium.js("var s = document.getElementById('verdict-filter'); s.value = 'wrong';"
                "s.dispatchEvent(new Event('change'))")
    assert chromium.js("[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.rank)") == ["2"]
    chromium.js("var s = document.getElementById('verdict-filter'); s.value = '';"
                "s.dispatchEvent(new Event('change')); document.querySelector('th[data-key=rank]').click()")
    assert chromium.js("[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.rank)") == \
        ["0", "1", "2"]
    assert chromium.js("document.querySelectorAll('svg').length") >= 2  # matplotlib's plots rendered inline
    # no console errors, no uncaught exceptions, nothing fetched but the file itself and inline data
    errors = [e for e in chromium.events
              if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    fetched = [e["params"]["request"]["url"] for e in chromium.events if e.get("method") == "Network.requestWillBeSent"]
    assert all(u.startswith(("file:", "data:")) for u in fetched), fetched
    height = chromium.js("document.documentElement.scrollHeight")
    chromium.call("Emulation.setDeviceMetricsOverride", width=1300, height=min(height, 6000), deviceScaleFactor=1,
                  mobile=False)
    shot = chromium.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    import base64

    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG")
    (tmp_path / "report.png").write_bytes(png)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "report.png", ARTIFACTS / "html-report-injected-faults.png")
    shutil.copy(page, ARTIFACTS / "html-report-injected-faults.html")
