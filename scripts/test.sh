#!/usr/bin/env bash
# The test suite: ruff and mypy first (installed by `scripts/install.sh --test`), then everything in
# parallel on two workers, then the tests that judge speed, alone, so that no device is called slow
# because a neighbouring test was busy on the same cores. Every stage runs; the script fails if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
lint=$?
# mypy on the core (the typed results, the judges, the worker protocol and harness, the store, the
# reports, the reproducers, the backend layer and the probes written once on it). The
# editable install is an import hook mypy cannot follow, so the checkout is seen as `chipcheck`
# through a link.
typed=$(mktemp -d)
ln -s "$PWD" "$typed/chipcheck"
(cd "$typed" && python3 -m mypy --config-file chipcheck/setup.cfg -m chipcheck.results -m chipcheck.failures \
    -m chipcheck.generator -p chipcheck.fleet.judge -m chipcheck.fleet.protocol -m chipcheck.fleet.harness -m chipcheck.fleet.supervisor \
    -m chipcheck.fleet.session -m chipcheck.fleet.store -m chipcheck.fleet.store_file -m chipcheck.fleet.history -m chipcheck.fleet.trends -m chipcheck.fleet.summary -p chipcheck.reports \
    -p chipcheck.reproducers \
    -m chipcheck.probes.keeping -p chipcheck.probes.backends -m chipcheck.probes.matmul -m chipcheck.probes.collectives \
    -m chipcheck.probes.jax_collectives -m chipcheck.probes.jax_retest -m chipcheck.probes.retest)
types=$?
rm -rf "$typed"
python3 -m pytest -n 2 -q -m "not timing" "$@"
first=$?
python3 -m pytest -q -m timing "$@"
second=$?
[[ $lint -eq 0 && $types -eq 0 && $first -eq 0 && $second -eq 0 ]]
