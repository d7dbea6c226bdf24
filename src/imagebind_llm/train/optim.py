"""AdamW over the trainable parameters with the official weight-decay grouping (``misc.add_weight_decay``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def scaled_lr(blr: float, global_batch: int) -> float:
    """The official rule ``lr = blr * global_batch / 256`` (global batch = per-process x accum x world)."""
    return blr * global_batch / 256


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: not to 1-D parameters nor biases, judged in the official layout.

    Our per-head gates ``gates.N`` are ``[H]`` but the official ``attention.gate`` is ``[1, H, 1, 1]``,
    which the official grouping treats as a matrix and decays; we keep that.
    """
    if name.startswith("gates."):
        return True
    return param.ndim > 1 and not name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the parameters with ``requires_grad``: no decay, then decay.

    ``model`` may be wrapped (DDP/FSDP prefixes are irrelevant: only the name's ending and the
    ``gates.`` prefix after them matter).
    """
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(_unwrapped(name), param) else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters; call set_trainable(model, phase) first")
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float] = (0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.95)) as the official recipes; ``lr`` is overwritten by the schedule every step."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def _unwrapped(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "model."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name
