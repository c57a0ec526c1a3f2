"""The bit-changing settings of a reproducer: applied as recorded, then shrunk to the ones it needs.

A capture records the process settings that change bits (`current`: deterministic
algorithms, threads, float32 matmul precision, TF32 and reduced-precision reductions, cuDNN
flags, the SDPA backends allowed) and the bit-changing environment variables set (`env:NAME`
keys: cuBLAS workspace and TF32 overrides, NCCL algorithm/protocol/channels, CPU ISA and oneDNN
math mode, thread counts). `shrink` reverts each in-process setting to torch's default in turn and
keeps it only when the failure goes away without it; an environment variable is read when a library
loads, so it is tried by running the candidate file without it (verify.shrink_env). repro.py then
sets only those (emit.py: the environment before torch loads), and its header says which were
dropped.
"""

from __future__ import annotations

import contextlib
import os
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
    "sdp_flash": True,
    "sdp_mem_efficient": True,
    "sdp_math": True,
    "sdp_cudnn": True,
    "sdp_math_low_precision_reduction": False,
}
"""torch's own defaults; `num_threads` has none (it is the machine's): reverting it leaves it unset."""

ENV = "env:"
"""The key prefix of an environment variable among the settings (`env:NCCL_ALGO`)."""

ENV_VARS: dict[str, str] = {
    "CUBLAS_WORKSPACE_CONFIG": "cuBLAS workspace: which GEMM algorithms (and their split-K) can run",
    "CUBLASLT_WORKSPACE_SIZE": "cuBLASLt workspace: which GEMM algorithms can run",
    "NVIDIA_TF32_OVERRIDE": "forces TF32 off (0) for every cuBLAS/cuDNN call",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "forces TF32 on in torch's cuBLAS calls",
    "TORCH_BLAS_PREFER_CUBLASLT": "cuBLASLt instead of cuBLAS for torch's GEMMs",
    "NCCL_ALGO": "NCCL's algorithm (ring, tree, NVLS, ...): the reduction order",
    "NCCL_PROTO": "NCCL's protocol (LL, LL128, Simple)",
    "NCCL_MIN_NCHANNELS": "NCCL's channels: how a reduction is split",
    "NCCL_MAX_NCHANNELS": "NCCL's channels: how a reduction is split",
    "NCCL_NVLS_ENABLE": "NVLink SHARP reductions (in the switch)",
    "NCCL_COLLNET_ENABLE": "in-network (SHARP) reductions",
    "ATEN_CPU_CAPABILITY": "which vectorized CPU kernels torch runs (default, avx2, avx512, ...)",
    "ONEDNN_DEFAULT_FPMATH_MODE": "oneDNN's implicit down-conversion of fp32 math (bf16, tf32)",
    "DNNL_DEFAULT_FPMATH_MODE": "oneDNN's implicit down-conversion of fp32 math (older name)",
    "ONEDNN_MAX_CPU_ISA": "the widest instruction set oneDNN uses",
    "DNNL_MAX_CPU_ISA": "the widest instruction set oneDNN uses (older name)",
    "MKL_CBWR": "MKL's conditional numerical reproducibility branch",
    "MKL_ENABLE_INSTRUCTIONS": "the widest instruction set MKL uses",
    "OMP_NUM_THREADS": "threads (the split of CPU reductions)",
    "MKL_NUM_THREADS": "MKL's threads",
}
"""The environment variables that change bits, read when the library loads (so never re-applied in a
running process): a capture records those that are set; repro.py sets the ones the failure needs
before torch loads and clears the others, so the vendor's shell cannot change what it runs."""


_RAW = {os.environ.encodekey(k): k for k in ENV_VARS}  # type: ignore[attr-defined]


def environment() -> dict[str, str]:
    """The bit-changing environment variables set in this process, as settings keys. (Read through
    os.environ's raw mapping: `name in os.environ` encodes the name on every lookup, and the flight
    recorder asks on every step.)"""
    raw = getattr(os.environ, "_data", None)
    if raw is None:
        return {ENV + k: os.environ[k] for k in ENV_VARS if k in os.environ}
    return {ENV + k: os.environ[k] for b, k in _RAW.items() if b in raw}


def env_of(s: dict[str, Any]) -> dict[str, str]:
    """The environment variables among settings `s`, by name."""
    return {k.removeprefix(ENV): str(v) for k, v in s.items() if k.startswith(ENV)}


def current() -> dict[str, Any]:
    """The bit-changing settings in force (what a capture and the flight recorder record)."""
    s: dict[str, Any] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "num_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        # which SDPA kernels may run (CPU too: its flash kernel and the math path differ in bits)
        **{"sdp_" + k: f() for k in ("flash", "mem_efficient", "math", "cudnn")
           if (f := getattr(torch.backends.cuda, k + "_sdp_enabled", None)) is not None},
        **environment(),
    }
    if (low := getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", None)) is not None:
        s["sdp_math_low_precision_reduction"] = low()
    if torch.cuda.is_available():
        s.update({"cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                  "cudnn_deterministic": torch.backends.cudnn.deterministic,
                  "cudnn_benchmark": torch.backends.cudnn.benchmark,
                  "matmul_allow_bf16_reduced_precision_reduction":
                      torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                  "matmul_allow_fp16_reduced_precision_reduction":
                      torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction})
    return s


def apply(s):
    """Set these settings (the keys `current` records; `env:` keys are set before torch loads,
    not here). Embedded by its own source into repro.py (emit.py), which has only torch: no
    annotations, no other names."""
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
        elif k in ("sdp_flash", "sdp_mem_efficient", "sdp_math", "sdp_cudnn"):
            enable = getattr(torch.backends.cuda, "enable_" + k.removeprefix("sdp_") + "_sdp", None)
            if enable is not None:  # an older torch without that backend: nothing to switch
                enable(bool(v))
        elif k == "sdp_math_low_precision_reduction":
            allow = getattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp", None)
            if allow is not None:
                allow(bool(v))


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
    differs from torch's default is dropped in turn, and stays dropped when the case still fails.
    Environment variables are kept: they cannot be undone in this process (verify.shrink_env tries
    them in a fresh one)."""
    keep = differs(recorded)
    for k in sorted(x for x in keep if not x.startswith(ENV)):
        trial = {x: v for x, v in keep.items() if x != k}
        if fails(trial):
            keep = trial
    return keep
