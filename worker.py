"""`python -m chipcheck.worker`: the per-device worker entry point.

`--plan PLAN.json|-`: the local launcher's worker (chipcheck.fleet.worker).
`run|links [OPTIONS]`: one rank under torchrun, srun or a Kubernetes Indexed Job (chipcheck.torchrun;
its click command line is imported only then, so the local launcher's workers start without it).
"""

import sys

from chipcheck.fleet.worker import main as plan_main


def main(argv: list[str] | None = None) -> int:
    """Route `run|links` to the torchrun entry point, anything else to the plan worker."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("run", "links"):
        from chipcheck.torchrun import main as torchrun_main

        return torchrun_main(argv)
    return plan_main(argv)


if __name__ == "__main__":
    sys.exit(main())
