"""Learning-rate schedule of the official recipes (``util/lr_sched.py``): set before every optimiser step
from the fractional epoch, linear warm-up from 0, then a half-cosine down to ``min_lr``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """``lr(e)`` for the fractional epoch ``e`` (e.g. 1.25 = a quarter into the second epoch).

    Attributes:
        lr: peak learning rate, reached at the end of warm-up.
        min_lr: final learning rate.
        warmup_epochs: length of the linear warm-up, in (fractional) epochs; 0 disables it.
        epochs: total length; the cosine spans ``[warmup_epochs, epochs]``.
    """

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: float

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs
        span = self.epochs - self.warmup_epochs
        progress = min((epoch - self.warmup_epochs) / span, 1.0) if span > 0 else 1.0
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: float) -> float:
        """Set every parameter group's lr for ``epoch`` (times its optional ``lr_scale``); returns the lr."""
        lr = self(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
