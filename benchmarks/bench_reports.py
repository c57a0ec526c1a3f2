"""How long the reports take, and how big they are, for a sweep of 10,000 devices.

    python3 benchmarks/bench_reports.py [--devices 10000] [--fail 0.03] [--out DIR]

A synthetic run (fleet.synthetic: results shaped like a real run's, 3% of devices failing as wrong,
slow, flaky or error) is rendered in every format; each timing is the best of `--repeat` renders.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from chipcheck.fleet import synthetic
from chipcheck.reports import formats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--fail", type=float, default=0.03, help="fraction of devices failing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="keep the rendered files here")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="chipcheck-bench-reports-"))
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    s = synthetic.run(a.devices, fail_fraction=a.fail)
    print(f"synthetic run: {len(s.devices)} devices, {len(s.failed)} failing, built in {time.perf_counter() - t:.2f}s")
    print(f"| format | render time (best of {a.repeat}) | size |")
    print("|---|---|---|")
    for fmt in formats.FORMATS:
        best, text = float("inf"), ""
        for _ in range(a.repeat):
            t = time.perf_counter()
            text = formats.render(s, fmt)
            best = min(best, time.perf_counter() - t)
        path = out / f"report.{ {'text': 'txt', 'junit': 'xml'}.get(fmt, fmt)}"
        path.write_text(text)
        size = path.stat().st_size
        print(f"| {fmt} | {best:.2f} s | {size / 1e6:.2f} MB |")
    print(f"files in {out}")


if __name__ == "__main__":
    main()
