"""Blame precision and recall: faults that act like a bad chip, whole default runs, who is named.

    python3 benchmarks/bench_blame.py [--devices cpu:4] [--ranks 0,3] [--kinds all|K1,K2]

For each fault kind (process scope: every matching kernel of the faulty rank's worker) and each
faulty rank, one whole `chipcheck run --profile quick`; a device counts as flagged when its verdict
is not `pass` (`suspect` included: it is a flag, only not a blame).
precision = flagged devices that were faulty / flagged devices; recall = faulty devices flagged /
faulty devices. Every miss and every innocent flag is listed with its probe's reason.
Corruption is judged here, not speed (--min-gap 0.9): the speed judge has its own benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdicts import machine, run  # noqa: E402

from chipcheck.probes import faults  # noqa: E402

KINDS = faults.CHIP_FAULTS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu:4")
    ap.add_argument("--ranks", default="0,3", help="faulty ranks, comma-separated")
    ap.add_argument("--kinds", default="all")
    a = ap.parse_args()
    kinds = list(KINDS) if a.kinds == "all" else a.kinds.split(",")
    ranks = [int(x) for x in a.ranks.split(",")]
    flagged = true_pos = faulty = 0
    notes = []
    print(f"# bench_blame {datetime.date.today()} on {machine()}: {a.devices}, kinds={len(kinds)}, ranks={ranks}")
    print(f"{'fault':<24} {'rank':>4}  verdicts                      wall")
    for kind in kinds:
        for r in ranks:
            res = run("--devices", a.devices, "--profile", "quick", "--min-gap", "0.9",
                      "--inject", KINDS[kind].format(r=r))
            bad = {k for k, v in res.verdicts.items() if v != "pass"}
            flagged += len(bad)
            true_pos += int(r in bad)
            faulty += 1
            if r not in bad:
                notes.append(f"MISS {kind} rank {r}")
            for k in sorted(bad - {r}):
                notes.append(f"INNOCENT FLAGGED {kind} rank {r}: rank {k} {res.verdicts[k]}")
            vs = " ".join(f"{k}:{v}" for k, v in sorted(res.verdicts.items()))
            print(f"{kind:<24} {r:>4}  {vs:<30} {res.wall_s:5.0f}s", flush=True)
    print(f"precision {true_pos / flagged if flagged else 1.0:.2f} ({true_pos}/{flagged} flagged devices were faulty)"
          f"  recall {true_pos / faulty:.2f} ({true_pos}/{faulty} faulty devices flagged)")
    for n in notes:
        print("  " + n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
