#!/usr/bin/env bash
# The test suite: ruff first (installed by `scripts/install.sh --test`), then everything in parallel on
# two workers, then the tests that judge speed, alone, so that no device is called slow because a
# neighbouring test was busy on the same cores. Every stage runs; the script fails if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
lint=$?
python3 -m pytest -n 2 -q -m "not timing" "$@"
first=$?
python3 -m pytest -q -m timing "$@"
second=$?
[[ $lint -eq 0 && $first -eq 0 && $second -eq 0 ]]
