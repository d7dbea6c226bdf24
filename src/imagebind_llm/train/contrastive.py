"""ImageBind's training objective: symmetric InfoNCE over the global batch, and recall@k to watch it.

For unit-norm embeddings ``a, b`` ``[N, D]`` of ``N`` pairs (row ``i`` of ``a`` belongs to row ``i`` of ``b``)
and a temperature ``T``::

    logits = a @ b.T / T                                   # [N, N]
    loss   = (CE(logits, arange(N)) + CE(logits.T, arange(N))) / 2

(ImageBind paper, eq. 1, made symmetric as in CLIP.) Under ``torchrun`` every process gathers the others'
embeddings *with* their gradients (`gather`), so the negatives are the whole global batch and every
process computes the loss of the whole global batch; DDP's averaging of the gradients then gives exactly
the gradient of a single process holding the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol  # the successor of torch.distributed.nn's all_gather
from torch import nn
from torch.nn import functional as F

from imagebind_llm.eval.zero_shot import recall_at_k
from imagebind_llm.train import distributed

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of 1 / T
RECALL_KS = (1, 5)


class LogitScale(nn.Module):
    """``1 / T`` as ``exp(log_scale)``, learned (a parameter) or fixed (a buffer), clamped at 100.

    Args:
        temperature: the (initial) temperature ``T``.
        learn: learn it (CLIP, ImageBind) or keep it fixed.
    """

    def __init__(self, temperature: float, learn: bool = True) -> None:
        super().__init__()
        value = torch.tensor(math.log(1 / temperature))
        if learn:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def gather(x: torch.Tensor) -> torch.Tensor:
    """``[n, D]`` rows of this process -> ``[world * n, D]`` rows of all processes in rank order, with
    gradients flowing back to each process's own rows (identity in a single process)."""
    if not distributed.is_distributed():
        return x
    return funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)  # backward: reduce-scatter of the sums


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of unit-norm ``a``, ``b`` ``[N, D]`` (pairs on the diagonal) at scale ``1 / T``."""
    logits = logit_scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def retrieval_recalls(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> dict[str, float]:
    """``{"<a>_to_<b>_R@k", "<b>_to_<a>_R@k" for k in 1, 5}`` for embeddings ``a``, ``b`` ``[N, D]`` of ``N``
    pairs (cosine similarity; the partner of row ``i`` is row ``i``; chance is ``k / N``)."""
    similarity = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    metrics = {}
    for k in RECALL_KS:
        metrics[f"{name_a}_to_{name_b}_R@{k}"] = recall_at_k(similarity, k)
        metrics[f"{name_b}_to_{name_a}_R@{k}"] = recall_at_k(similarity.T, k)
    return metrics
