"""On a healthy GPU, a probe's repeats of deterministic work agree bit for bit (gpu-marked).

Measured on an H200 (2026-12-04): under torch's warn-only deterministic mode, the GPT step's fused
SDPA backward and cuDNN attention's dq differ between repeats there, which made a healthy chip
`flaky`. The Trainer now runs forward and backward in strict mode on CUDA (model/train.py); the
attention probe measures cuDNN's spread instead of comparing its bits.
"""

from __future__ import annotations

import pytest
import torch

from chipcheck.fleet.harness import apply_settings
from chipcheck.model import Trainer, data
from chipcheck.model.train import determinism
from chipcheck.probes.model_step.checks import checksum
from chipcheck.probes.model_step.config import model_configs, step_config


def _steps(precision: str, steps: int = 3) -> tuple[list[float], int]:
    mc, tc = model_configs(step_config("model_step", "quick", "cuda"), precision)
    tr = Trainer(mc, tc, seed=11, device="cuda")
    losses = [float(tr.step(*data.batch(mc, 11, s, batch_size=tc.batch_size, device="cuda"))) for s in range(steps)]
    return losses, int(checksum(tr.state_tensors()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_gpt_step_repeats_bit_for_bit_under_the_harness_settings(precision: str) -> None:
    apply_settings("cuda", 1, [])
    assert determinism("cuda") == "strict"
    first, again = _steps(precision), _steps(precision)
    assert first == again
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # strict for the step only


def test_strict_mode_covers_the_step_only_and_only_on_cuda() -> None:
    """The toggle itself (no GPU needed: torch's mode is process-wide): strict inside, warn-only after,
    also when the step raises; CPU steps keep what the harness set."""
    from chipcheck.model.train import strict_determinism

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with strict_determinism("cpu"):
            assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert determinism("cpu") == "as set"
        with pytest.raises(RuntimeError, match="boom"), strict_determinism("cuda"):
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            raise RuntimeError("boom")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        assert determinism("cuda") == "as set"  # a user who turned it off keeps it off
        with strict_determinism("cuda"):
            assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
