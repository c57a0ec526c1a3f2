"""Model-step probes: train the reference GPT (chipcheck.model) for K steps, as a check.

Catches: corruption that only shows in the composition of kernels (forward, backward, optimizer,
gradient all-reduce), nondeterministic chips, data-parallel replicas that drift apart, and slow
chips (throughput measured here, judged by the fleet).

`model_step` (per device, one case per precision): K steps run `repeats` times from the same seed.
- repeat-determinism: the loss trace and the hash of the final state (parameters and AdamW
  moments) must be bitwise identical across repeats;
- fleet consensus: that hash (with the loss trace) must match every device of one fingerprint;
- fp64 reference: the same K steps in float64 on the CPU; each loss must lie within
  `tol * |loss64|` (tol per precision, docs/model.md), which catches systematic error;
- non-finite losses.

`model_dp` (collective, all ranks): K data-parallel steps (bucketed gradient all-reduce).
- gradient cross-check (every `verify_every` steps): rank r also replays the shard of rank r+1,
  so every shard's local gradient is computed twice, by two chips, before anything is reduced.
  Their checksums must match bitwise; when they do not, both chips recompute the shard and the
  odd one out is named (a chip that disagrees with itself; or, if both are self-consistent, the
  one farther from a float64 recomputation). The named chip's gradient is replaced by the good
  copy before the all-reduce, so one bad chip does not corrupt the others' training;
- replica check (every `replica_every` steps and after the last): a checksum of every rank's parameters, all-gathered; data-parallel
  replicas (and the replicated parameters of a tensor-parallel pair) must hold identical bits;
  the minority is named and re-synchronised from the majority;
- the global loss trace against the fp64 reference (not attributable to one rank).
The `tp2` case splits attention and MLP over rank pairs (tensor parallel) with data parallelism
over the pairs; it runs the replica check and the fp64 reference (not the gradient cross-check).

User steps: `register_step` turns a team's own model step into a probe with the `model_step`
oracles (repeat-determinism, consensus, non-finite). Modules named in the `chipcheck.steps`
entry-point group, or in CHIPCHECK_STEPS (comma-separated), are imported when this module is.

Modules: config.py (StepConfig and its profile loading), checks.py (the shared oracles, checksum and
speed metrics), step.py (`model_step`), dp.py (`model_dp`), dp_checks.py (its gradient cross-check
and replica check), user_steps.py (`register_step`).

Cost: the checks are a checksum per step and one replayed forward/backward per `verify_every`
steps (benchmarks/bench_model_step.py: overhead ratio vs the bare loop).
"""

from __future__ import annotations

from .. import faults
from .checks import SPEC_TFLOPS, checksum
from .config import StepConfig, model_configs, model_seed
from .step import ModelStepProbe

# isort: split
# Import order is registration order: model_step, then model_dp, then the user steps.
from .dp import ModelDPProbe, run_dp
from .user_steps import UserStep, load_user_steps, register_step

__all__ = ["SPEC_TFLOPS", "ModelDPProbe", "ModelStepProbe", "StepConfig", "UserStep", "checksum",
           "model_configs", "model_seed", "register_step", "run_dp"]

faults.CALL_TIME_PROBES.update({"model_step", "model_dp"})

# Last, once register_step is bound here: the user modules it imports may import it from this package.
load_user_steps()
