"""`python -m chipcheck.worker`: the per-device worker entry point (see chipcheck.fleet.worker)."""

import sys

from chipcheck.fleet.worker import main

if __name__ == "__main__":
    sys.exit(main())
