"""The bit-changing settings of a reproducer: applied as recorded, then shrunk to the ones it needs.

A capture records the process settings that change bits (capture.settings: deterministic
algorithms, threads, float32 matmul precision, TF32 and reduced-precision reductions, cuDNN
flags). `shrink` reverts each to torch's default in turn and keeps it only when the failure goes
away without it; repro.py then sets only those (emit.py), and its header says which were dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

DEFAULTS: dict[str, Any] = {
    "deterministic_algorithms": False,
    "float32_matmul_precision": "highest",
    "default_dtype": "float32",
    "cuda_matmul_allow_tf32": False,
    "cudnn_allow_tf32": True,
    "cudnn_deterministic": False,
    "cudnn_benchmark": False,
    "matmul_allow_bf16_reduced_precision_reduction": True,
    "matmul_allow_fp16_reduced_precision_reduction": True,
}
"""torch's own defaults; `num_threads` has none (it is the machine's): reverting it leaves it unset."""


def current() -> dict[str, Any]:
    """The bit-changing settings in force (as a capture records them)."""
    from .capture import settings as now

    return now()


def apply(s):
    """Set these settings (the keys capture.settings records). Embedded by its own source into
    repro.py (emit.py), which has only torch: no annotations, no other names."""
    for k, v in s.items():
        if k == "deterministic_algorithms":
            torch.use_deterministic_algorithms(bool(v), warn_only=True)
        elif k == "num_threads":
            torch.set_num_threads(int(v))
        elif k == "float32_matmul_precision":
            torch.set_float32_matmul_precision(str(v))
        elif k == "default_dtype":
            torch.set_default_dtype(getattr(torch, str(v)))
        elif k == "cuda_matmul_allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = bool(v)
        elif k == "cudnn_allow_tf32":
            torch.backends.cudnn.allow_tf32 = bool(v)
        elif k == "cudnn_deterministic":
            torch.backends.cudnn.deterministic = bool(v)
        elif k == "cudnn_benchmark":
            torch.backends.cudnn.benchmark = bool(v)
        elif k == "matmul_allow_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = bool(v)
        elif k == "matmul_allow_fp16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = bool(v)


@contextlib.contextmanager
def applied(s: dict[str, Any]) -> Iterator[None]:
    """These settings (the others as torch's defaults) while inside; the process's own afterwards."""
    before = current()
    apply({**{k: v for k, v in DEFAULTS.items() if k in before}, **s})
    try:
        yield
    finally:
        apply(before)


def differs(recorded: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings that are not torch's defaults (only those can matter)."""
    return {k: v for k, v in recorded.items() if k == "num_threads" or DEFAULTS.get(k, object()) != v}


def shrink(recorded: dict[str, Any], fails: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The fewest of the recorded settings under which `fails(settings)` still holds: each one that
    differs from torch's default is dropped in turn, and stays dropped when the case still fails."""
    keep = differs(recorded)
    for k in sorted(keep):
        trial = {x: v for x, v in keep.items() if x != k}
        if fails(trial):
            keep = trial
    return keep
