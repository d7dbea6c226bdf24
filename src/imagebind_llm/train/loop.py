"""The training loop shared by both stages, and the pieces it is made of.

Stage 1 and stage 2 differ only in what they build (the trainable set via the phase, the data, the
defaults of their YAML); see ``recipes/``. One optimiser step (`train_step`) is::

    lr = schedule(epoch + step_in_epoch / steps_per_epoch)        # set before the step, official
    for each of accum_iter micro-batches: loss = module(**batch); (loss / accum_iter).backward()
    optional clipping; AdamW step
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from imagebind_llm.cache import FeatureCache
from imagebind_llm.hub.files import make_dir
from imagebind_llm.model import ModelSpec, create_model
from imagebind_llm.model.imagebind_llm import ImageBindLLM, Retrieve
from imagebind_llm.model.media import MIX_EPS
from imagebind_llm.train import distributed
from imagebind_llm.train.checkpoint import CHECKPOINT_DIR, EXPORTS, LATEST, export, load_checkpoint, save_checkpoint
from imagebind_llm.train.config import ModelSection, TrainConfig
from imagebind_llm.train.data import DataFormatError, TrainDataset, batch_order, collate, steps_per_epoch
from imagebind_llm.train.logging import ProgressLogger
from imagebind_llm.train.optim import build_optimizer, scaled_lr
from imagebind_llm.train.schedule import WarmupCosine

log = logging.getLogger(__name__)


# -------------------------------------------------------------------- the differentiable step
def predicting(labels: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool: the positions whose next label counts (not 0)."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != 0
    return predicts


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Official loss: cross-entropy of ``logits [B, S, V]`` at position t against ``labels [B, S]`` at t+1,
    label 0 ignored; or of ``logits [N, V]`` at the positions of `predicting` only (the same value). A batch
    without any label gives a graph-connected zero."""
    targets = labels[:, 1:]
    if logits.dim() == 3:
        logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)
    else:
        targets = targets[targets != 0]
    if not (targets != 0).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, ignore_index=0)


class TrainStep(nn.Module):
    """Batch -> loss, as one module so that DDP/FSDP see the encoder, bind network and decoder together.

    Args:
        model: the ImageBind-LLM model (its phase decides what trains).
        retrieve: optional cache blend of the mixed features (`cache_retrieve`).
    """

    def __init__(self, model: ImageBindLLM, retrieve: Retrieve | None = None) -> None:
        super().__init__()
        self.model = model
        self.retrieve = retrieve

    def visual(self, batch_size: int, has_media: torch.Tensor, images: torch.Tensor | None,
               features: torch.Tensor | None) -> torch.Tensor | None:
        """Bind output ``[B, 1, dim]`` for the rows with media (zeros elsewhere), or None without media.

        ``images`` ``[M, 3, 224, 224]`` go through the frozen encoder; ``features`` ``[M, D]`` are its
        precomputed L2-normalised outputs, scaled as the official mix scales a single image.
        ``M`` = number of True rows of ``has_media``.
        """
        if images is not None:
            bound = self.model.encode_inputs({"image": (images, 1.0)}, self.retrieve)
        elif features is not None:
            bound = self.model.encode_features(features * (1 / (1 + MIX_EPS)), self.retrieve)
        else:
            return None
        if len(bound) == batch_size:
            return bound
        rows = has_media.nonzero().squeeze(1)
        return bound.new_zeros(batch_size, *bound.shape[1:]).index_copy(0, rows, bound)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, has_media: torch.Tensor | None = None,
                images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss for ``tokens``/``labels`` ``[B, S]`` (see `imagebind_llm.train.data.collate`)."""
        if has_media is None:
            has_media = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
        visual = self.visual(len(tokens), has_media, images, features)
        mask = None if visual is None or bool(has_media.all()) else has_media
        # the final norm and LM head only where a label is predicted (a yes/no sample: 2 of ~60 positions)
        return lm_loss(self.model(tokens, visual, has_media=mask, logits_mask=predicting(labels)), labels)


def enable_activation_checkpointing(model: ImageBindLLM) -> None:
    """Recompute each decoder block's activations in the backward pass (`torch.utils.checkpoint`)."""
    for block in model.llm.layers:
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> torch.Tensor:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict[str, torch.Tensor]],
               *, device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
               clip_grad: float | None = None) -> float:
    """One optimiser step over ``micro_batches`` (gradient accumulation); returns their mean loss.

    The learning rate must already be set (`WarmupCosine.apply`). Gradients are synchronised across
    processes only on the last micro-batch.

    Raises:
        FloatingPointError: the loss is not finite (the official engine stops the run too).
    """
    device = torch.device(device)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
            module.set_requires_gradient_sync(last)
        sync = module.no_sync() if hasattr(module, "no_sync") and not last else contextlib.nullcontext()
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with sync, amp:
            loss = module(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
        (loss / len(micro_batches)).backward()
        total += loss.detach().float()
    mean = total.item() / len(micro_batches)
    if not math.isfinite(mean):
        raise FloatingPointError(f"loss is {mean}; stopping (lower optim.lr, set optim.clip_grad=1.0, or use "
                                 "train.precision=fp32; --resume continues from the last checkpoint)")
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], clip_grad)
    optimizer.step()
    return mean


def fsdp_groups(model: ImageBindLLM) -> list[list[nn.Module]]:
    """Decoder modules FSDP2 may shard and gather one group at a time: per block the MLP, and the q/k/o
    projections. The value projections stay in the root group because `ImageBindLLM.injections` applies
    every layer's ``wv`` to the visual feature before the blocks run."""
    groups = []
    for block in model.llm.layers:
        groups.append([block.feed_forward])
        groups.append([block.attention.wq, block.attention.wk, block.attention.wo])
    return groups


# -------------------------------------------------------------------- building the model
def build_model(cfg: ModelSection, phase: str, *, need_encoder: bool, feature_dim: int | None = None
                ) -> ImageBindLLM:
    """The model of the ``model`` config section on the CPU, in ``phase``, with its initial adapter loaded.

    The base LLM is dense even from a GGUF file: training multiplies by float32 weights anyway.

    Args:
        need_encoder: load ImageBind (False when training from a feature store or on text only).
        feature_dim: ImageBind output width without the encoder (None: the adapter's, else 1024).
    """
    if need_encoder and not cfg.imagebind:
        raise ValueError("this run encodes images, so it needs model.imagebind (an ImageBind checkpoint such as "
                         "imagebind_w3D.pth); stage 1 can instead train from data.features")
    return create_model(ModelSpec(
        llm=cfg.llm, adapter=cfg.adapter, tokenizer=cfg.tokenizer, imagebind=cfg.imagebind if need_encoder else None,
        with_encoder=need_encoder, imagebind_config=cfg.imagebind_config, phase=phase, max_seq_len=cfg.max_seq_len, lora_rank=cfg.lora_rank,
        inject_layers=cfg.inject_layers, lora_layers=cfg.lora_layers, bind_hidden_dim=cfg.bind_hidden_dim, bind_blocks=cfg.bind_blocks,
        feature_dim=feature_dim, quantized=False))


def cache_retrieve(cfg: ModelSection, model: ImageBindLLM, encoder: str) -> Retrieve | None:
    """The blend with the cache ``cfg.cache`` (mixed features ``[B, D]`` -> blended ``[B, D]``), or None.

    Args:
        encoder: name of the encoder behind the training features, checked against the cache's.
    """
    if cfg.cache is None:
        return None
    cache = FeatureCache.load(cfg.cache)
    cache.check_compatible(model.config.feature_dim, encoder)
    return functools.partial(cache.blend, options=cfg.blend_options())


# -------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """What a run did: the trained ``model`` (`ImageBindLLM`; `train bind`: the `ImageBind` encoder), ``losses`` of
    the optimiser steps it ran (from ``start_step`` on), ``lrs`` likewise, the step it stopped at, and where it
    wrote the checkpoint and exports (main process)."""

    model: nn.Module
    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "final_loss": self.losses[-1] if self.losses else None,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "exports": {k: str(v) for k, v in self.exports.items()}}


def train(config: TrainConfig, model: ImageBindLLM, dataset: TrainDataset, device: torch.device,
          resume: str | Path | None = None, retrieve: Retrieve | None = None, *, overwrite: bool = False
          ) -> TrainResult:
    """Train ``model`` (already in its phase) on ``dataset`` as ``config`` says; see the module doc.

    Stops at the end of ``train.epochs`` or after ``train.max_steps`` optimiser steps (a stop before the
    end writes a checkpoint that ``resume`` continues exactly); exports only at the end of the schedule,
    before that step's checkpoint (a run whose last checkpoint ends the schedule has its exports).
    ``retrieve`` blends the mixed features with the cache (`cache_retrieve`).

    Raises:
        FileExistsError: a new run (no ``resume``) into an output folder holding a run, without ``overwrite``.
        ValueError: the data do not fill one optimiser step, or ``resume`` is already at the run's last step.
    """
    optim_cfg, run = config.optim, config.train
    phase = model.config.phase
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(run.seed + rank)
    accum = optim_cfg.accum_iter
    per_epoch = steps_per_epoch(len(dataset), run.batch_size, world, accum)
    global_batch = run.batch_size * accum * world
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} examples do not fill one optimiser step of {global_batch} (train.batch_size "
                         f"{run.batch_size} x {world} processes x optim.accum_iter {accum}); lower them or add data")
    check_output_dir(run.output_dir, resume, overwrite)

    model.to(device)
    if run.activation_checkpointing:
        enable_activation_checkpointing(model)
    amp_dtype = torch.bfloat16 if run.precision == "bf16" and device.type == "cuda" else None
    text_only = any(ex.image is None for ex in dataset.examples) and dataset.text_only == "no_injection"
    module = distributed.wrap(TrainStep(model, retrieve), run.distributed, device, blocks=fsdp_groups(model),
                              replicated=model.encoder, find_unused_parameters=text_only, param_dtype=amp_dtype)

    lr = optim_cfg.lr if optim_cfg.lr is not None else scaled_lr(optim_cfg.blr, global_batch)
    optimizer = build_optimizer(module, lr, optim_cfg.weight_decay, optim_cfg.betas, optim_cfg.eps)
    schedule = WarmupCosine(lr, optim_cfg.min_lr, optim_cfg.warmup_epochs, run.epochs)
    total = per_epoch * run.epochs
    stop = total if run.max_steps is None else min(total, run.max_steps)
    log.info("%s: %d examples, %d steps/epoch x %d epochs, global batch %d, lr %.3e", phase, len(dataset),
             per_epoch, run.epochs, global_batch, lr)

    first = dataset[(0, 0)]
    if "error" in first:
        raise DataFormatError(first["error"])
    if not first["labels"].any():
        log.warning("the first example has no answer token left after truncation to data.max_words=%d; "
                    "raise data.max_words (the prompt alone may fill it with this tokenizer)", dataset.max_words)
    step = 0
    if resume is not None:
        step = load_checkpoint(resume, module, optimizer, phase)["step"]
        if step >= stop:
            raise ValueError(f"the checkpoint of {resume} is at step {step} and this run stops at step {stop} "
                             f"({per_epoch} steps/epoch x train.epochs {run.epochs}, train.max_steps "
                             f"{run.max_steps}): nothing to train; raise train.epochs or train.max_steps")
    result = TrainResult(model=model, start_step=step, step=step)
    logger = ProgressLogger(run.output_dir, stop, step, log_every=run.log_every, enabled=distributed.is_main(),
                            progress=run.progress, tensorboard=run.tensorboard)
    module.train()
    if model.encoder is not None:
        model.encoder.eval()  # frozen: no DropPath/dropout in the encoder

    def export_run() -> None:
        with distributed.full_parameters(module):
            if distributed.is_main():
                result.exports = export(model, run.output_dir)

    def save() -> None:  # step and epoch: the loop's current ones
        result.checkpoint = save_checkpoint(run.output_dir, module, optimizer, step=step, epoch=epoch,
                                            phase=phase, config=config.to_dict())

    try:
        while step < stop:
            epoch, in_epoch = divmod(step, per_epoch)
            order = batch_order(len(dataset), batch_size=run.batch_size, world_size=world, rank=rank,
                                accum_iter=accum, seed=run.seed, epoch=epoch, start_step=in_epoch)
            loader = iter(DataLoader(dataset, batch_sampler=list(order), collate_fn=collate,
                                     num_workers=config.data.num_workers, pin_memory=device.type == "cuda"))
            for in_epoch in range(in_epoch, per_epoch):
                micro = [next(loader) for _ in range(accum)]
                unreadable = next((b["error"] for b in micro if "error" in b), None)
                if unreadable is not None:
                    raise DataFormatError(unreadable)
                step_lr = schedule.apply(optimizer, epoch + in_epoch / per_epoch)
                loss = train_step(module, optimizer, micro, device=device, amp_dtype=amp_dtype,
                                  clip_grad=optim_cfg.clip_grad)
                step += 1
                loss = float(distributed.mean(torch.tensor(loss, device=device)))
                result.losses.append(loss)
                result.lrs.append(step_lr)
                tokens = sum(int((b["tokens"] != 0).sum()) for b in micro) * world
                logger.step(step, epoch + (in_epoch + 1) / per_epoch, loss, step_lr, global_batch, tokens)
                if end_of_step(step, total=total, stop=stop, save_every=run.save_every, export=export_run, save=save):
                    break
    finally:
        logger.close()
    result.step, result.records = step, logger.records
    return result


def end_of_step(step: int, *, total: int, stop: int, save_every: int, export: Callable[[], None],
                save: Callable[[], None]) -> bool:
    """What follows optimiser step ``step`` in every training loop: ``export`` after the run's last step
    ``total`` (then all processes wait), ``save`` a checkpoint every ``save_every`` steps and at ``stop``.
    True when the loop stops here (``stop`` < ``total`` with ``train.max_steps``)."""
    if step == total:
        export()
        distributed.barrier()
    if step % save_every == 0 or step == stop:
        save()
    return step == stop


def check_output_dir(output_dir: str | Path, resume: str | Path | None, overwrite: bool,
                     exports: Sequence[str] = EXPORTS) -> None:
    """Refuse a new run into a folder holding a run (checkpoints or exports) unless ``overwrite``; with it, the
    old run's checkpoints go now (they would mix with the new run's) and its exports stay until the new
    run's replace them.

    Raises:
        FileExistsError: naming what was found and the ways on (``--resume``, ``--overwrite``).
        NotADirectoryError: ``output_dir`` is a file.
    """
    output_dir = make_dir(output_dir, "train.output_dir")
    if resume is not None:
        return
    found = [p for p in (output_dir / CHECKPOINT_DIR / LATEST, *(output_dir / e for e in exports)) if p.exists()]
    if found and not overwrite:
        raise FileExistsError(f"train.output_dir {output_dir} holds a training run ({found[0]}); continue it with "
                              f"--resume {output_dir}, replace it with --overwrite, or set another train.output_dir")
    if overwrite and distributed.is_main() and (output_dir / CHECKPOINT_DIR).is_dir():
        log.warning("--overwrite: removing the checkpoints of the previous run in %s", output_dir)
        shutil.rmtree(output_dir / CHECKPOINT_DIR)
