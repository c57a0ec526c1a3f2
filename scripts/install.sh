#!/usr/bin/env bash
# Install chipcheck into the current Python environment.
#   bash scripts/install.sh          chipcheck itself (+ the GPU extras where a GPU is present)
#   bash scripts/install.sh --test   and the test tools
# On a CPU-only host torch is pinned first, so pip takes the CPU build rather than a multi-GB CUDA one
# (set PIP_INDEX_URL=https://download.pytorch.org/whl/cpu where PyPI's default wheel is a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${CHIPCHECK_TORCH:-2.13.0}
extras=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="gpu"
    "$PY" -m pip install -q "torch>=2.4"
elif ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==${TORCH_VERSION}"
fi
if [[ "${1:-}" == "--test" ]]; then
    extras="${extras:+$extras,}test"
fi
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
