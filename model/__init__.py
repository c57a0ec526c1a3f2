"""chipcheck.model: the reference training stack (a small GPT and its data/tensor-parallel step).

Imports go one way: probes and reproducers import this package; it imports nothing of fleet/,
probes/, reports/ or reproducers/ (only the core, e.g. the leaf `chipcheck.generator` for counter-based
inputs).
"""

from .config import ConfigError, GPTConfig, TrainConfig
from .gpt import GPT
from .train import Parallel, Trainer, make_parallel, reference_losses

__all__ = ["ConfigError", "GPT", "GPTConfig", "Parallel", "TrainConfig", "Trainer", "make_parallel",
           "reference_losses"]
