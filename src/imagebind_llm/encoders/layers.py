"""Pre-norm transformer pieces shared by the ImageBind towers and Point-BERT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MLP_RATIO


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training; identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention on ``[B, N, D]`` through ``F.scaled_dot_product_attention``.

    ``add_bias_kv`` appends one learned key and value (``[1, 1, D]``, not projected) after the
    projection, as ``nn.MultiheadAttention(add_bias_kv=True)`` does, so keys have ``N + 1`` positions.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, add_bias_kv: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, D)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, D)], dim=1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (drop path while training)."""

    def __init__(self, dim: int, num_heads: int, *, eps: float, qkv_bias: bool = True,
                 add_bias_kv: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, add_bias_kv=add_bias_kv)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), causal))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 to ``rate``."""
    return [rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0] * depth
