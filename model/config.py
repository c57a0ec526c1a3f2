"""Typed, frozen configurations of the reference GPT and of its training step.

Presets size the model per device kind: `tiny` runs a step in milliseconds on one CPU core (CI, the
quick profile), `bench` is the CPU benchmark size, `gpu` is large enough for an H100-class chip to
run its GEMMs near peak. Every field is validated on construction with a fix-it message.
"""

from __future__ import annotations

from dataclasses import dataclass

NORMS = ("rmsnorm", "layernorm")
PRECISIONS = ("fp32", "bf16", "fp64")


class ConfigError(ValueError):
    """A configuration that cannot describe a working model or step."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTConfig:
    """Shape of the GPT: token + learned position embedding, pre-norm blocks, tied head."""

    vocab_size: int = 256
    """Tokens in the vocabulary (the head is tied to the token embedding)."""
    seq_len: int = 32
    """Context length (positions in one sequence)."""
    d_model: int = 64
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads (split across tensor-parallel ranks)."""
    n_layers: int = 2
    """Transformer blocks."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of d_model (split across tensor-parallel ranks)."""
    norm: str = "rmsnorm"
    """`rmsnorm` or `layernorm` (no bias)."""
    norm_eps: float = 1e-5
    """Epsilon inside the norm."""
    init_std: float = 0.02
    """Standard deviation of the counter-based uniform init of every matrix."""

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"GPTConfig.norm={self.norm!r}; use one of {', '.join(NORMS)}")
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GPTConfig.{name} must be >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"GPTConfig.d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_hidden(self) -> int:
        return self.d_model * self.mlp_ratio

    def matmul_params(self) -> int:
        """Weights that take part in a GEMM per token (blocks and the tied head; not positions)."""
        block = 4 * self.d_model * self.d_model + 2 * self.d_model * self.d_hidden
        return self.n_layers * block + self.vocab_size * self.d_model

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N + 12 L T d (the PaLM MFU convention)."""
        return 6.0 * self.matmul_params() + 12.0 * self.n_layers * self.seq_len * self.d_model

    @staticmethod
    def tiny() -> GPTConfig:
        """CPU/CI size: ~0.1 M parameters, a step in a few milliseconds on one core."""
        return GPTConfig()

    @staticmethod
    def bench() -> GPTConfig:
        """CPU benchmark size: ~3 M parameters, GEMM-dominated on one core."""
        return GPTConfig(vocab_size=1024, seq_len=128, d_model=256, n_heads=8, n_layers=4)

    @staticmethod
    def gpu() -> GPTConfig:
        """GPU size: ~0.5 B parameters; d_model 2048 keeps an H100's tensor cores busy in bf16."""
        return GPTConfig(vocab_size=32768, seq_len=2048, d_model=2048, n_heads=16, n_layers=8)

    @staticmethod
    def preset(name: str) -> GPTConfig:
        presets = {"tiny": GPTConfig.tiny, "cpu": GPTConfig.tiny, "bench": GPTConfig.bench, "gpu": GPTConfig.gpu}
        if name not in presets:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(presets)}")
        return presets[name]()


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """One training step: AdamW on the mean next-token cross-entropy, data and tensor parallel."""

    batch_size: int = 8
    """Sequences per data-parallel rank per step."""
    lr: float = 1e-3
    """AdamW learning rate (constant: K probe steps need no schedule)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    precision: str = "fp32"
    """`fp32` (everything fp32), `bf16` (autocast matmuls/attention in bf16, fp32 master weights and
    loss) or `fp64` (the reference)."""
    bucket_mb: float = 25.0
    """Size cap of one gradient all-reduce bucket (MiB), as in DistributedDataParallel."""
    tp: int = 1
    """Tensor-parallel ranks per model replica (1 or 2)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig.precision={self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise ConfigError("TrainConfig.batch_size must be >= 1")
        if self.tp not in (1, 2):
            raise ConfigError(f"TrainConfig.tp={self.tp}: tensor parallelism supports 1 or 2 ranks")
        if self.bucket_mb <= 0:
            raise ConfigError("TrainConfig.bucket_mb must be > 0")
