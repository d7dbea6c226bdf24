"""The training-free cache blend of ImageBind-LLM (paper §3.4), as pure tensor algebra.

Given a query ``q`` (the mixed ImageBind feature, not re-normalised) and its top-k neighbours in a bank
of unit-norm image features with inner-product similarities ``s``:

    a = softmax(temperature * s)          over the k neighbours
    r = normalize(sum_j a_j * proto_j)
    q' = normalize((1 - weight) * q + weight * r)

`BlendOptions` holds ``top_k``, ``temperature`` and ``weight``; what a request leaves unset comes from
the cache's stored defaults (official: 10, 20, 0.5). `ExactBank` is the simplest cache (an in-memory
matrix, exact search by matmul); the FAISS-backed `imagebind_llm.cache.FeatureCache` uses the same
`blend_neighbours`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.nn import functional as F


def _finite(x: Any) -> bool:
    """A finite real number (NaN, infinities and booleans fail)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class BlendOptions:
    """How the cache pulls a feature towards its neighbours; None: the cache's stored default.

    Attributes:
        top_k: neighbours blended (official 10).
        temperature: multiplier on the similarities before the softmax (official ``cache_t`` 20).
        weight: weight of the retrieved prototype, in [0, 1] (official ``cache_weight`` 0.5).
    """

    top_k: int | None = None
    temperature: float | None = None
    weight: float | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and not (isinstance(self.top_k, numbers.Integral) and not isinstance(self.top_k, bool)
                                           and self.top_k >= 1):
            raise ValueError(f"cache top_k must be a whole number >= 1, got {self.top_k!r}")
        if self.temperature is not None and not (_finite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"cache temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.weight is not None and not (_finite(self.weight) and 0.0 <= self.weight <= 1.0):
            raise ValueError(f"cache weight must be in [0, 1], got {self.weight!r}")

    def resolve(self, defaults: "BlendOptions") -> "BlendOptions":
        """These options with every unset field taken from ``defaults``."""
        return BlendOptions(*(getattr(self, f.name) if getattr(self, f.name) is not None else getattr(defaults, f.name)
                              for f in dataclasses.fields(self)))

    def replace(self, **changes: Any) -> "BlendOptions":
        return dataclasses.replace(self, **changes)


OFFICIAL_BLEND = BlendOptions(top_k=10, temperature=20.0, weight=0.5)


class FeatureRetriever(Protocol):
    """Anything usable as the cache: blends mixed features ``[B, D]`` with their neighbours -> ``[B, D]``."""

    def blend(self, queries: torch.Tensor, options: BlendOptions | None = None) -> torch.Tensor: ...


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

    def blend(self, queries: torch.Tensor, options: BlendOptions | None = None) -> torch.Tensor:
        opts = (options or BlendOptions()).resolve(OFFICIAL_BLEND)
        sims, idx = self.search(queries, opts.top_k)
        out = blend_neighbours(queries.to(self.vectors.device), sims, self.vectors[idx], opts.temperature, opts.weight)
        return out.to(queries.device)
