"""CUDA-event timing (probes/base.py Timer): what the probes' throughput is measured with on a GPU."""

from __future__ import annotations

import time

import pytest
import torch

from chipcheck.probes import base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_event_timing_measures_the_device_work() -> None:
    dev = torch.device("cuda")
    timer = base.Timer(dev)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    for _ in range(3):  # cuBLAS heuristics, clocks
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, s = timer.time(lambda: [a @ a for _ in range(20)])
    wall = time.perf_counter() - t0
    # the events bracket the queued GEMMs: never longer than the host saw, and most of it
    assert 0 < s <= wall * 1.05 + 1e-4
    assert s >= 0.5 * wall, (s, wall)
    assert 10 < 20 * 2 * 4096**3 / s / 1e12 < 5000  # TFLOP/s of a real GPU, not a unit error
