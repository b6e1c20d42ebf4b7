"""Shape of the reference model and how tensor parallelism splits it across ranks."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A model shape that cannot be built or split across the requested ranks."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU) with seeded random weights.

    The defaults are tiny so that tests on two shared CPU cores are fast.
    """

    vocab: int = 512
    hidden: int = 128
    layers: int = 2
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 16
    ffn: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def check_tp(self, tp: int) -> None:
        """Raises ConfigError when the model cannot be split over ``tp`` ranks."""
        if tp <= 0:
            raise ConfigError(f"tp must be > 0, got {tp}")
        if self.heads % tp or self.ffn % tp:
            raise ConfigError(f"heads ({self.heads}) and ffn ({self.ffn}) must be divisible by tp={tp}")
        if self.kv_heads % tp and tp % self.kv_heads:
            raise ConfigError(f"kv_heads ({self.kv_heads}) and tp ({tp}) must divide one another")

    def q_heads_per_rank(self, tp: int) -> int:
        return self.heads // tp

    def kv_heads_per_rank(self, tp: int) -> int:
        """SGLang's rule: every rank holds max(1, kv_heads // tp) KV heads."""
        return max(1, self.kv_heads // tp)

    def first_kv_head(self, tp: int, rank: int) -> int:
        """Global index of the first KV head rank ``rank`` holds (ranks share heads when tp > kv_heads)."""
        if tp <= self.kv_heads:
            return rank * self.kv_heads_per_rank(tp)
        return rank * self.kv_heads // tp
