"""`train bind`: bind a modality to ImageBind's space (ImageBind paper §3.2; its training code was never released).

Towers of one `ImageBind` train with symmetric InfoNCE (`imagebind_llm.train.contrastive`) against a frozen
anchor tower (``bind.anchor``, e.g. vision), or two towers against each other (``bind.mode: joint``, CLIP-style):

* ``scratch``: the trained towers start from random weights (their sizes: ``bind.imagebind_config`` +
  ``bind.tower`` overrides), every other tower comes from ``bind.imagebind``;
* ``full``: the trained towers start from ``bind.imagebind`` and train entirely;
* ``lora``: LoRA (`imagebind_llm.model.peft.LoRALinear`) on every block's fused q/k/v and output projections
  and MLP of the trained towers; only the LoRA weights train, and are merged into the export;
* ``joint``: the two ``bind.modalities`` towers train together (from ``bind.imagebind`` or from scratch).

Negatives are the global batch under ``torchrun``. With ``bind.anchor_features`` the anchor side is encoded
once into a feature store (`imagebind_llm.cache.shards`, resumable, shared between processes) and the
anchor tower never runs in the loop. Held-out pairs give recall@1/5 both ways every ``data.eval_every``
steps and at the end. The export is a whole encoder in the official layout, ``encoder/imagebind.pth`` with
``encoder/imagebind_config.json``, which `imagebind_llm.encoders.load_official` and ``create_model``
(``imagebind=``, ``imagebind_config=``) load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from imagebind_llm.cache.shards import FeatureStore, extract_features
from imagebind_llm.encoders import ImageBind, ImageBindConfig, from_official, to_official
from imagebind_llm.encoders.convert import has_point_branch, official_key
from imagebind_llm.encoders.imagebind import read_config
from imagebind_llm.encoders.layers import Block
from imagebind_llm.hub import fetch, read_state_dict
from imagebind_llm.hub.files import atomic_files, make_dir
from imagebind_llm.model.peft import LoRALinear, set_trainable
from imagebind_llm.train import distributed
from imagebind_llm.train.checkpoint import load_checkpoint, save_checkpoint
from imagebind_llm.train.config import BindConfig, BindSection
from imagebind_llm.train.contrastive import LogitScale, gather, info_nce, retrieval_recalls
from imagebind_llm.train.data import batch_order, steps_per_epoch
from imagebind_llm.train.logging import ProgressLogger
from imagebind_llm.train.loop import TrainResult, check_output_dir, end_of_step, train_step
from imagebind_llm.train.optim import build_optimizer, scaled_lr
from imagebind_llm.train.pairs import FEATURES, PairDataset, collate_pairs, generated_pairs, load_item, read_pairs
from imagebind_llm.train.schedule import WarmupCosine

log = logging.getLogger(__name__)

PHASE = "bind"
EXPORT_DIR = "encoder"
WEIGHTS_FILE, CONFIG_FILE = "imagebind.pth", "imagebind_config.json"


# -------------------------------------------------------------------- the encoder
def encoder_config(bind: BindSection, state: dict[str, torch.Tensor] | None) -> ImageBindConfig:
    """``bind.imagebind_config`` (null: huge) with the ``bind.tower`` overrides; the point branch as the
    checkpoint has it (without a checkpoint: as the file says, else built)."""
    with_point = has_point_branch(state) if state is not None else True
    if bind.imagebind_config is None:
        base = ImageBindConfig.huge(with_point=with_point)
    else:
        base = read_config(Path(bind.imagebind_config), with_point)
    return ImageBindConfig.from_dict({**base.to_dict(), **bind.tower})


def build_encoder(bind: BindSection) -> ImageBind:
    """The whole encoder of a run, trained towers included, before LoRA (see the module doc for the modes).

    Raises:
        ValueError: the checkpoint does not fit the config (the towers that are not trained must match it).
    """
    state = read_state_dict(fetch(bind.imagebind), what="ImageBind checkpoint") if bind.imagebind else None
    encoder = ImageBind(encoder_config(bind, state))
    fresh = bind.modalities if state is None or bind.mode == "scratch" else []
    for name in fresh:
        for pname, param in encoder.towers[name].named_parameters():
            if pname in ("cls_token", "pos_embed"):  # zeros in the module, ImageBind's init for training
                nn.init.trunc_normal_(param, std=0.02)
    if state is None:
        return encoder
    ours = encoder.state_dict()
    drop = {official_key(k) for k in ours if k.split(".")[1] in fresh}
    loaded = from_official({k: v for k, v in state.items() if k not in drop}, encoder, strict=not fresh)
    missing = sorted(k for k in ours if k not in loaded and k.split(".")[1] not in fresh)
    if missing:
        raise ValueError(f"{bind.imagebind} lacks tensors of the towers that are not trained: {missing[:5]}")
    encoder.load_state_dict(loaded, strict=False)
    return encoder


def add_lora(tower: nn.Module, rank: int) -> None:
    """LoRA on every block of ``tower``: the fused q/k/v and output projections and both MLP layers."""
    for block in [m for m in tower.modules() if isinstance(m, Block)]:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            setattr(parent, name, LoRALinear.from_linear(getattr(parent, name), rank))


def merged_state_dict(encoder: ImageBind) -> dict[str, torch.Tensor]:
    """``encoder``'s state dict with every LoRA path folded into its weight (plain `ImageBind` keys)."""
    state = encoder.state_dict()
    for name, module in encoder.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight()
            del state[f"{name}.lora_a.weight"], state[f"{name}.lora_b.weight"]
    return state


def export_encoder(encoder: ImageBind, output_dir: str | Path) -> dict[str, Path]:
    """Write ``encoder`` (LoRA merged) in the official layout with its config JSON into ``output_dir/encoder``;
    both files are renamed into place together, the config last."""
    folder = make_dir(Path(output_dir) / EXPORT_DIR, "export folder")
    with torch.device("meta"):
        plain = ImageBind(encoder.config)
    plain.load_state_dict({k: v.detach().cpu() for k, v in merged_state_dict(encoder).items()}, assign=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    with atomic_files(weights, config) as (weights_tmp, config_tmp):
        torch.save(to_official(plain), weights_tmp)
        config_tmp.write_text(json.dumps({"ImageBindModel_kwargs": encoder.config.to_dict()}, indent=1))
    return {"weights": weights, "config": config}


# -------------------------------------------------------------------- the differentiable step
class BindStep(nn.Module):
    """Batch -> symmetric InfoNCE over the global batch, as one module for DDP.

    Args:
        encoder: the ImageBind holding the anchor and trained towers.
        anchor: the frozen tower's modality (None: joint training of two ``modalities``).
        modalities: the trained towers; each is bound to the anchor (the loss is their mean).
        logit_scale: ``1 / T``.
    """

    def __init__(self, encoder: ImageBind, anchor: str | None, modalities: Sequence[str],
                 logit_scale: LogitScale) -> None:
        super().__init__()
        self.encoder, self.anchor, self.modalities, self.logit_scale = encoder, anchor, list(modalities), logit_scale

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unit-norm ``{modality: [B, D]}`` of a batch (``FEATURES`` rows stand for the anchor's)."""
        out = {}
        if FEATURES in batch:
            out[self.anchor] = batch[FEATURES]
        elif self.anchor is not None:
            with torch.no_grad():
                out[self.anchor] = F.normalize(self.encoder({self.anchor: batch[self.anchor]})[self.anchor], dim=-1)
        trained = self.encoder({m: batch[m] for m in self.modalities})
        return {**out, **{m: F.normalize(e, dim=-1) for m, e in trained.items()}}

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        embeddings = {m: gather(e) for m, e in self.embed(batch).items()}
        scale = self.logit_scale()
        if self.anchor is None:
            return info_nce(embeddings[self.modalities[0]], embeddings[self.modalities[1]], scale)
        losses = [info_nce(embeddings[self.anchor], embeddings[m], scale) for m in self.modalities]
        return torch.stack(losses).mean()

    def pairs_to_score(self) -> list[tuple[str, str]]:
        if self.anchor is None:
            return [(self.modalities[0], self.modalities[1])]
        return [(self.anchor, m) for m in self.modalities]


def trainable_params(step: BindStep, bind: BindSection) -> dict[str, nn.Parameter]:
    """What trains: the trained towers (LoRA weights only in ``lora`` mode) and a learned temperature.

    A tower's own output scale (text's learned ``log_logit_scale``) stays as it is: the loss normalises the
    embeddings, so it has no gradient, and Adam would turn rounding noise into steps.
    """
    params = {f"logit_scale.{n}": p for n, p in step.logit_scale.named_parameters()}
    for name in bind.modalities:
        for pname, p in step.encoder.towers[name].named_parameters():
            if pname != "log_logit_scale" and (bind.mode != "lora" or ".lora_" in pname):
                params[f"encoder.towers.{name}.{pname}"] = p
    return params


@torch.inference_mode()
def evaluate(step: BindStep, dataset: PairDataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """Recall@1/5 both ways between the anchor and each trained tower (joint: the two towers) on ``dataset``."""
    modes = {m: m.training for m in step.modules()}
    step.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[(0, i)] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate_pairs(items).items()}
        for m, e in step.embed(batch).items():
            parts.setdefault(m, []).append(e.float().cpu())
    for m, training in modes.items():
        m.train(training)
    embeddings = {m: torch.cat(p) for m, p in parts.items()}
    metrics: dict[str, float] = {}
    for a, b in step.pairs_to_score():
        metrics.update(retrieval_recalls(embeddings[a], embeddings[b], a, b))
    return metrics


# -------------------------------------------------------------------- data
def datasets(config: BindConfig, step: BindStep, device: torch.device) -> tuple[PairDataset, PairDataset | None]:
    """The training and held-out sets; with ``bind.anchor_features`` their anchor side is encoded into
    ``<anchor_features>/train`` and ``/eval`` first (skipped when done; every process encodes its shards)."""
    bind, data = config.bind, config.data
    names = ([bind.anchor] if bind.anchor else []) + bind.modalities
    if data.generator is not None:
        train = PairDataset(generated_pairs(data.generator, data.generator_train, config.train.seed, names))
        held_out = (PairDataset(generated_pairs(data.generator, data.generator_eval, config.train.seed + 1, names))
                    if data.generator_eval else None)
        return train, held_out
    splits = {"train": read_pairs(data.train, names), "eval": read_pairs(data.eval, names) if data.eval else None}
    if bind.anchor_features is None:
        return tuple(PairDataset(p) if p is not None else None for p in splits.values())
    out = []
    for split, pairs in splits.items():
        if pairs is None:
            out.append(None)
            continue
        folder = Path(bind.anchor_features) / split
        sources = [p[bind.anchor] for p in pairs]
        extract_features(sources, folder, _anchor_encoder(step, device), encoder=_anchor_name(bind),
                         batch_size=data.eval_batch_size, progress=config.train.progress)
        distributed.barrier()
        out.append(PairDataset(pairs, FeatureStore(folder, sources), bind.anchor))
    return tuple(out)


def _anchor_encoder(step: BindStep, device: torch.device) -> Callable[[list[str]], torch.Tensor]:
    """``sources -> [n, D]`` unit-norm embeddings of the frozen anchor tower (an `EncodeFn` of the store)."""

    @torch.inference_mode()
    def encode(sources: list[str]) -> torch.Tensor:
        x = torch.stack([load_item(step.anchor, s) for s in sources]).to(device)
        return F.normalize(step.encoder({step.anchor: x})[step.anchor].float(), dim=-1).cpu()

    return encode


def _anchor_name(bind: BindSection) -> str:
    """What a feature store records as its encoder: the anchor tower of the checkpoint and config."""
    parts = [Path(p).name for p in (bind.imagebind, bind.imagebind_config) if p] or ["random"]
    return f"{'+'.join(parts)}:{bind.anchor}"


# -------------------------------------------------------------------- the loop
@dataclass
class BindResult(TrainResult):
    """A `TrainResult` whose ``model`` is the trained `ImageBind`, with the last evaluation (``metrics``)."""

    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "metrics": self.metrics}


def run(config: BindConfig, resume: str | Path | None = None, *, overwrite: bool = False) -> BindResult:
    """Run `train bind` as configured (see ``configs/bind.yaml``); ``resume`` (a run folder or checkpoint)
    continues exactly, ``overwrite`` replaces another run in ``train.output_dir``.

    Raises:
        FileExistsError: a new run into an output folder holding a run, without ``overwrite``.
        ValueError: the data do not fill one global batch, or ``resume`` is already at the last step.
    """
    bind, data, optim_cfg, run_cfg = config.bind, config.data, config.optim, config.train
    device = distributed.setup(run_cfg.device)
    rank, world = distributed.rank(), distributed.world_size()
    check_output_dir(run_cfg.output_dir, resume, overwrite, exports=(EXPORT_DIR,))
    torch.manual_seed(run_cfg.seed)  # the same new weights on every process
    encoder = build_encoder(bind)
    if bind.mode == "lora":
        for name in bind.modalities:
            add_lora(encoder.towers[name], bind.lora_rank)
    step_module = BindStep(encoder, bind.anchor, bind.modalities, LogitScale(bind.temperature, bind.learn_temperature))
    set_trainable(step_module, trainable_params(step_module, bind))
    step_module.to(device)
    train_set, eval_set = datasets(config, step_module, device)

    torch.manual_seed(run_cfg.seed + rank)
    per_epoch = steps_per_epoch(len(train_set), run_cfg.batch_size, world, 1, data.group_size)
    global_batch = run_cfg.batch_size * world
    if per_epoch == 0:
        raise ValueError(f"{len(train_set)} pairs do not fill one global batch of {global_batch} (train.batch_size "
                         f"{run_cfg.batch_size} x {world} processes); lower it or add data")
    amp_dtype = torch.bfloat16 if run_cfg.precision == "bf16" and device.type == "cuda" else None
    module = distributed.wrap(step_module, "ddp", device)
    lr = optim_cfg.lr if optim_cfg.lr is not None else scaled_lr(optim_cfg.blr, global_batch)
    optimizer = build_optimizer(module, lr, optim_cfg.weight_decay, optim_cfg.betas, optim_cfg.eps)
    schedule = WarmupCosine(lr, optim_cfg.min_lr, optim_cfg.warmup_epochs, run_cfg.epochs)
    total = per_epoch * run_cfg.epochs
    stop = total if run_cfg.max_steps is None else min(total, run_cfg.max_steps)
    log.info("bind %s -> %s (%s): %d pairs, %d steps/epoch x %d epochs, global batch %d, lr %.3e", bind.modalities,
             bind.anchor, bind.mode, len(train_set), per_epoch, run_cfg.epochs, global_batch, lr)

    step = 0
    if resume is not None:
        step = load_checkpoint(resume, module, optimizer, PHASE)["step"]
        if step >= stop:
            raise ValueError(f"the checkpoint of {resume} is at step {step} and this run stops at step {stop}: "
                             "nothing to train; raise train.epochs or train.max_steps")
    result = BindResult(model=encoder, start_step=step, step=step)
    logger = ProgressLogger(run_cfg.output_dir, stop, step, log_every=run_cfg.log_every, enabled=distributed.is_main(),
                            progress=run_cfg.progress, tensorboard=run_cfg.tensorboard)
    set_modes(step_module, bind)

    def export_run() -> None:
        if distributed.is_main():
            result.exports = export_encoder(encoder, run_cfg.output_dir)

    def save() -> None:  # step and epoch: the loop's current ones
        result.checkpoint = save_checkpoint(run_cfg.output_dir, module, optimizer, step=step, epoch=epoch,
                                            phase=PHASE, config=config.to_dict())

    try:
        while step < stop:
            epoch, in_epoch = divmod(step, per_epoch)
            order = batch_order(len(train_set), batch_size=run_cfg.batch_size, world_size=world, rank=rank,
                                accum_iter=1, seed=run_cfg.seed, epoch=epoch, start_step=in_epoch,
                                group=data.group_size)
            loader = iter(DataLoader(train_set, batch_sampler=list(order), collate_fn=collate_pairs,
                                     num_workers=data.num_workers, pin_memory=device.type == "cuda"))
            for in_epoch in range(in_epoch, per_epoch):
                step_lr = schedule.apply(optimizer, epoch + in_epoch / per_epoch)
                loss = train_step(module, optimizer, [next(loader)], device=device, amp_dtype=amp_dtype,
                                  clip_grad=optim_cfg.clip_grad)
                step += 1
                result.losses.append(loss)
                result.lrs.append(step_lr)
                logger.step(step, epoch + (in_epoch + 1) / per_epoch, loss, step_lr, global_batch, 0)
                if eval_set is not None and (step % data.eval_every == 0 or step == stop):
                    if distributed.is_main():
                        result.metrics = {"step": step, **evaluate(step_module, eval_set, data.eval_batch_size,
                                                                   device)}
                        logger.add(result.metrics)
                        log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items()
                                                                 if k != "step"))
                    distributed.barrier()
                if end_of_step(step, total=total, stop=stop, save_every=run_cfg.save_every, export=export_run,
                               save=save):
                    break
    finally:
        logger.close()
    result.step, result.records = step, logger.records
    return result


def set_modes(step: BindStep, bind: BindSection) -> None:
    """Trained towers in training mode (DropPath), every other tower in eval mode."""
    step.train()
    for name, tower in step.encoder.towers.items():
        tower.train(name in bind.modalities)
