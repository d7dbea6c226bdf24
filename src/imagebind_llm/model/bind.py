"""The bind network: ImageBind's 1024-d space -> the LLM's width (paper §3.2, Fig. 2).

    F [B, 1, feature_dim]
      -> proj (Linear, bias)                          [B, 1, dim]
      -> 3 x  x + w2( SiLU(w1(norm(x))) * w3(norm(x)) )   (RMSNorm eps 1e-6, no biases)
      -> [B, 1, dim]     (no output norm, no zero init)

The legacy variant of the released ``7B-beta.pth`` uses LayerNorm and biased linears instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from imagebind_llm.llm.model import RMSNorm


class BindBlock(nn.Module):
    """One residual SwiGLU block: ``x + w2(silu(w1(n(x))) * w3(n(x)))``."""

    def __init__(self, dim: int, hidden_dim: int, *, legacy: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if legacy else RMSNorm(dim, eps=eps)
        self.w1 = nn.Linear(dim, hidden_dim, bias=legacy)
        self.w2 = nn.Linear(hidden_dim, dim, bias=legacy)
        self.w3 = nn.Linear(dim, hidden_dim, bias=legacy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class BindNetwork(nn.Module):
    """Maps ImageBind features ``[..., feature_dim]`` to ``[..., dim]``."""

    def __init__(self, feature_dim: int, dim: int, hidden_dim: int, n_blocks: int = 3, *,
                 legacy: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, dim)
        self.blocks = nn.ModuleList(BindBlock(dim, hidden_dim, legacy=legacy, eps=eps) for _ in range(n_blocks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj(features)
        for block in self.blocks:
            x = block(x)
        return x
