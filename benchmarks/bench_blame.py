"""Blame precision and recall: faults that act like a bad chip, whole default runs, who is named.

    python3 benchmarks/bench_blame.py [--devices cpu:4] [--ranks 0,3] [--kinds all|K1,K2] [--together]

For each fault kind (process scope: every matching kernel of the faulty rank's worker) and each
faulty rank, one whole `chipcheck run --profile quick`. With --together, one run per kind with every
rank of --ranks faulty at once; a kind `K1+K2` puts K1 on the first rank and K2 on the second (e.g.
recv-corrupt+send-corrupt: one rank damages what it receives, another what it sends).
A device counts as flagged when its verdict
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
    ap.add_argument("--together", action="store_true", help="every rank of --ranks faulty in one run")
    a = ap.parse_args()
    kinds = list(KINDS) if a.kinds == "all" else a.kinds.split(",")
    ranks = [int(x) for x in a.ranks.split(",")]
    flagged = true_pos = faulty = 0
    notes = []
    print(f"# bench_blame {datetime.date.today()} on {machine()}: {a.devices}, kinds={len(kinds)}, ranks={ranks}"
          + (" together" if a.together else ""))
    print(f"{'fault':<24} {'rank':>4}  verdicts                      wall")
    for kind in kinds:
        for bad_ranks in [ranks] if a.together else [[r] for r in ranks]:
            parts = kind.split("+")
            specs = [KINDS[parts[min(i, len(parts) - 1)]].format(r=r) for i, r in enumerate(bad_ranks)]
            res = run("--devices", a.devices, "--profile", "quick", "--min-gap", "0.9", "--inject", ";".join(specs))
            bad = {k for k, v in res.verdicts.items() if v != "pass"}
            flagged += len(bad)
            true_pos += len(bad & set(bad_ranks))
            faulty += len(bad_ranks)
            where = "|".join(map(str, bad_ranks))
            notes += [f"MISS {kind} rank {r}" for r in bad_ranks if r not in bad]
            for k in sorted(bad - set(bad_ranks)):
                notes.append(f"INNOCENT FLAGGED {kind} rank {where}: rank {k} {res.verdicts[k]}")
            vs = " ".join(f"{k}:{v}" for k, v in sorted(res.verdicts.items()))
            print(f"{kind:<24} {where:>4}  {vs:<30} {res.wall_s:5.0f}s", flush=True)
    print(f"precision {true_pos / flagged if flagged else 1.0:.2f} ({true_pos}/{flagged} flagged devices were faulty)"
          f"  recall {true_pos / faulty:.2f} ({true_pos}/{faulty} faulty devices flagged)")
    for n in notes:
        print("  " + n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
