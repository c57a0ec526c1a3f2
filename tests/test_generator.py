"""The counter-based generator gives the same bits on every backend present, for any slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chipcheck import generator as g


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 7])
def test_uniform_torch_cpu_matches_numpy_bit_for_bit(seed: int) -> None:
    t = g.uniform((64, 33), seed, "A")
    n = g.uniform_np((64, 33), seed, "A")
    assert n.dtype == np.float32
    assert np.array_equal(_bits(t), n.view(np.int32))
    assert float(t.min()) >= -1.0 and float(t.max()) < 1.0


def test_small_ints_match_numpy_and_stay_in_range() -> None:
    t = g.small_ints((50, 50), 3, "X", 4)
    n = g.small_ints_np((50, 50), 3, "X", 4)
    assert np.array_equal(t.numpy(), n)
    assert set(np.unique(n).tolist()) == set(range(-4, 5))


def test_any_slice_regenerates_alone() -> None:
    whole = g.uniform((10, 100), 5, "S").reshape(-1)
    part = g.uniform((3, 100), 5, "S", offset=400).reshape(-1)
    assert torch.equal(whole[400:700], part)


def test_streams_and_seeds_differ() -> None:
    a = g.uniform((1000,), 1, "A")
    assert not torch.equal(a, g.uniform((1000,), 1, "B"))
    assert not torch.equal(a, g.uniform((1000,), 2, "A"))
    # and the values look uniform, not degenerate
    assert abs(float(a.mean())) < 0.1 and 0.25 < float(a.var()) < 0.42


def test_low_precision_is_one_rounding_of_the_float32_values() -> None:
    f = g.uniform((256,), 9, "L")
    assert torch.equal(g.uniform((256,), 9, "L", dtype=torch.bfloat16), f.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_bit_for_bit() -> None:
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(g.uniform((513, 257), 11, "G", device="cuda", dtype=dt).cpu(),
                           g.uniform((513, 257), 11, "G", dtype=dt))


@pytest.mark.gpu
def test_cupy_matches_numpy_bit_for_bit() -> None:
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("cupy present but no CUDA device")
    assert np.array_equal(cp.asnumpy(g.uniform_np((300, 7), 4, "C", xp=cp)), g.uniform_np((300, 7), 4, "C"))


def test_indices_beyond_32_bits_match_numpy_and_differ_from_low_ones() -> None:
    off = 2**32 + 5
    t = g.uniform((100,), 3, "H", offset=off)
    assert np.array_equal(_bits(t), g.uniform_np((100,), 3, "H", offset=off).view(np.int32))
    assert not torch.equal(t, g.uniform((100,), 3, "H", offset=5))
