"""The vendor bundle: repro.py, env.json, the chip's chipcheck history, input hashes and a README.

env.json holds what NVML says about the chip when it is there (name, UUID, serial, VBIOS, driver,
ECC counters, clocks, temperature, power) and what torch and platform say otherwise. `redact`
strips module names, file paths, stack frames and host names, the capture's own environment
included (the user's company keeps its code and machines private).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path
from typing import Any

from . import format as fmt
from .capture import environment


def nvml_env(index: int = 0) -> dict[str, Any]:
    """The chip as NVML sees it; {} without NVML (CPU hosts, no nvidia-ml-py)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no NVML here: env.json says what torch and platform know
        return {}
    out: dict[str, Any] = {}
    calls = {"name": lambda: pynvml.nvmlDeviceGetName(h), "uuid": lambda: pynvml.nvmlDeviceGetUUID(h),
             "serial": lambda: pynvml.nvmlDeviceGetSerial(h), "vbios": lambda: pynvml.nvmlDeviceGetVbiosVersion(h),
             "driver": pynvml.nvmlSystemGetDriverVersion,
             "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(h, 0),
             "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
             "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, 1),
             "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, 2),
             "ecc_volatile_uncorrected": lambda: pynvml.nvmlDeviceGetTotalEccErrors(h, 1, 0),
             "ecc_volatile_corrected": lambda: pynvml.nvmlDeviceGetTotalEccErrors(h, 0, 0)}
    for k, fn in calls.items():
        try:
            v = fn()
            out[k] = v.decode() if isinstance(v, bytes) else v
        except Exception:  # one unsupported query must not lose the others
            out[k] = "n/a"
    return out


_PATH = re.compile(r"(/[^\s'\":]+)+\.py(:\d+)?(:\w+)?|\b[\w.]+\.(py|pyc)\b")


def redact_text(text: str) -> str:
    """Stack frames and file paths -> '<redacted>'."""
    text = re.sub(r'"Seen at: [^\n]*\n', "", text)
    text = re.sub(r"Seen at: [^\n]*\n", "", text)
    return _PATH.sub("<redacted>", text)


def _host_names(env: dict[str, Any]) -> set[str]:
    """Every host name the bundle would carry: this host's and the one the capture ran on."""
    import platform
    import socket

    names = {platform.node(), socket.gethostname()}
    for part in (env.get("software", {}), env.get("capture", {}).get("env", {}) if isinstance(
            env.get("capture"), dict) else {}):
        if isinstance(part, dict) and isinstance(part.get("host"), str):
            names.add(part["host"])
    return {n for n in names if n and len(n) >= 2}


def _scrub(text: str, hosts: set[str]) -> str:
    for h in sorted(hosts, key=len, reverse=True):
        text = text.replace(h, "<redacted>")
    return text


def _drop_hosts(obj: Any, hosts: set[str]) -> Any:
    """`obj` without any `host`/`hostname` key, and with every host name in a string replaced."""
    if isinstance(obj, dict):
        return {k: _drop_hosts(v, hosts) for k, v in obj.items() if k not in ("host", "hostname")}
    if isinstance(obj, list | tuple):
        return [_drop_hosts(v, hosts) for v in obj]
    if isinstance(obj, str):
        return _scrub(obj, hosts)
    return obj


def history(db: str | None, uuid: str) -> list[dict[str, Any]]:
    """This chip's chipcheck results from the store (empty when there is none)."""
    import sqlite3

    if not db or not Path(db).exists():
        return []
    try:
        con = sqlite3.connect(db)
        rows = con.execute("SELECT run_id, probe, case_name, verdict, started FROM results WHERE device_uuid = ?"
                           " ORDER BY started", (uuid,)).fetchall()
    except sqlite3.Error:
        return []
    return [dict(zip(("run_id", "probe", "case", "verdict", "started"), r, strict=True)) for r in rows]


def make(source: str | Path, output: str | Path, *, repro: str | None = None, redact: bool = False,
         db: str | None = None, passes_on: str = "float64 reference (cpu64)") -> Path:
    """Write bundle.tar.gz from a capture directory (with its shrunk `repro` text) or a repro.py."""
    src = Path(source)
    env: dict[str, Any] = {"software": environment(), "chip": nvml_env(), "created": time.strftime("%Y-%m-%d")}
    inputs: dict[str, str] = {}
    device = "cpu"
    if src.is_dir():
        cap = fmt.load(src)
        env["capture"] = {"env": cap.env, "settings": cap.settings, "rank": cap.rank, "world": cap.world}
        device = cap.device
        inputs = {f"rank{cap.rank}/v{t.vid}": t.sha256 for t in cap.tensors.values()}
        if repro is None:
            raise fmt.CaptureError(f"{src}: bundling a capture needs its repro.py (run `chipcheck repro shrink`)")
    else:
        if not src.is_file():
            raise fmt.CaptureError(f"{src}: neither a capture directory nor a repro.py")
        repro = src.read_text()
    inputs.update({f"embedded[{i}]": h for i, h in enumerate(re.findall(r'"sha256": "([0-9a-f]{64})"', repro))})
    if redact:
        repro = redact_text(repro)
        hosts = _host_names(env)
        env = _drop_hosts(env, hosts)
        repro = _scrub(repro, hosts)
    said = {k: m.group(1) for k in ("Trials", "Evidence") if (m := re.search(rf"^{k}: (.+)$", repro, re.M))}
    run = (f"Run: `python repro.py --device {device}` (the failure is intermittent: its default --repeat is "
           f"the trial plan)" if "Trials" in said else f"Run: `python repro.py --device {device} --repeat 10`")
    readme = (f"# chipcheck reproducer\n\n{run}\n\n"
              f"Exit 1: the bug reproduces; exit 0: it does not.\n\n"
              f"Passes on: {passes_on}. Fails on: {device} ({env['chip'].get('name', env['software']['os'])}).\n\n"
              + "".join(f"{k}: {v}\n\n" for k, v in said.items()) +
              "Needs only torch and numpy. env.json: the chip and software; inputs.sha256: every input's hash;"
              " history.json: this chip's chipcheck results.\n")
    files = {"repro.py": repro, "env.json": json.dumps(env, indent=2, default=str), "README.md": readme,
             "inputs.sha256": "".join(f"{h}  {k}\n" for k, h in sorted(inputs.items())),
             "history.json": json.dumps(history(db, env["chip"].get("uuid", "")), indent=2, default=str)}
    out = Path(output)
    with tarfile.open(out, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"bundle/{name}")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return out
