"""The training-free cache blend of ImageBind-LLM (paper §3.4), as pure tensor algebra.

Given a query ``q`` (the mixed ImageBind feature, not re-normalised) and its top-k neighbours in a bank
of unit-norm image features with inner-product similarities ``s``:

    a = softmax(temperature * s)          over the k neighbours
    r = normalize(sum_j a_j * proto_j)
    q' = normalize((1 - weight) * q + weight * r)

`ExactBank` is the simplest cache (an in-memory matrix, exact search by matmul); the FAISS-backed
`imagebind_llm.cache.FeatureCache` uses the same `blend_neighbours`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.nn import functional as F


class FeatureRetriever(Protocol):
    """Anything the model accepts as ``cache``: maps mixed features ``[B, D]`` to blended ``[B, D]``."""

    def blend(self, queries: torch.Tensor, top_k: int = 10, temperature: float = 20.0,
              weight: float = 0.5) -> torch.Tensor: ...


def blend_neighbours(queries: torch.Tensor, sims: torch.Tensor, neighbours: torch.Tensor,
                     temperature: float, weight: float) -> torch.Tensor:
    """Blend queries with their retrieved neighbours.

    Args:
        queries: ``[B, D]`` mixed features.
        sims: ``[B, k]`` inner products between each query and its neighbours.
        neighbours: ``[B, k, D]`` the neighbours' stored (unit-norm) features.
        temperature: multiplier on the similarities before the softmax (official ``cache_t``).
        weight: weight of the retrieved prototype (official ``cache_weight``).

    Returns:
        ``[B, D]`` unit-norm blended features, in the dtype of ``queries``.
    """
    attn = torch.softmax(sims.float() * temperature, dim=-1)
    proto = F.normalize(torch.einsum("bk,bkd->bd", attn, neighbours.float()), dim=-1)
    mixed = (1.0 - weight) * queries.float() + weight * proto
    return F.normalize(mixed, dim=-1).to(queries.dtype)


class ExactBank:
    """An in-memory bank of unit-norm features ``[N, D]`` searched exactly by inner product."""

    def __init__(self, vectors: torch.Tensor) -> None:
        if vectors.ndim != 2:
            raise ValueError(f"a feature bank must be [N, D], got shape {tuple(vectors.shape)}")
        self.vectors = vectors.float()

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, D]`` -> similarities ``[B, k]`` and indices ``[B, k]``, best first."""
        if queries.shape[-1] != self.dim:
            raise ValueError(f"query dim {queries.shape[-1]} does not match the bank's dim {self.dim}")
        sims = queries.float().to(self.vectors.device) @ self.vectors.T
        return sims.topk(min(top_k, self.vectors.shape[0]), dim=-1)

    def blend(self, queries: torch.Tensor, top_k: int = 10, temperature: float = 20.0,
              weight: float = 0.5) -> torch.Tensor:
        sims, idx = self.search(queries, top_k)
        out = blend_neighbours(queries.to(self.vectors.device), sims, self.vectors[idx], temperature, weight)
        return out.to(queries.device)
