"""Training checkpoints: trainable weights + optimizer + position + RNG, written atomically; and exports.

A checkpoint is one file ``output_dir/checkpoints/step-NNNNNNN.pt`` holding::

    {"step", "epoch", "phase", "config",          # position: optimiser steps done (data order is a
     "trainable": {name: tensor},                  #   function of (seed, epoch), so the step locates it)
     "optimizer": {...}, "rng": [per-rank states]}

It is written to a temporary file and renamed, then ``latest.json`` is replaced the same way, so a crash
never leaves a truncated checkpoint behind the pointer. Frozen weights (the base LLM, ImageBind) are
never saved. The state dicts come from ``torch.distributed.checkpoint.state_dict`` with full (unsharded)
tensors, so the same file serves single-process, DDP and FSDP2 runs and any world size.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from imagebind_llm.hub.files import atomic_files, atomic_write, make_dir
from imagebind_llm.model.convert import official_adapter_state_dict
from imagebind_llm.model.factory import ADAPTER_FILE, CONFIG_FILE, write_pretrained
from imagebind_llm.model.imagebind_llm import ImageBindLLM
from imagebind_llm.train import distributed

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
EXPORTS = ("adapter.pth", "pretrained")  # what `export` writes into the output folder
_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_LOAD = StateDictOptions(full_state_dict=True, strict=False)


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states (storable with ``weights_only`` loading)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
                    epoch: int, phase: str, config: dict[str, Any]) -> Path | None:
    """Write the checkpoint of ``step`` (collective: every process must call it); returns its path on rank 0.

    ``config`` is the run's `TrainConfig` as a plain dict (``to_dict``), kept for the record.
    """
    weights = get_model_state_dict(module, options=_SAVE)
    optim_state = get_optimizer_state_dict(module, optimizer, options=_SAVE)
    rngs = distributed.gather_objects(rng_state())
    if not distributed.is_main():
        return None
    folder = make_dir(Path(output_dir) / CHECKPOINT_DIR, "checkpoint folder")
    path = folder / f"step-{step:07d}.pt"
    payload = {"step": step, "epoch": epoch, "phase": phase, "config": config, "trainable": weights,
               "optimizer": optim_state, "rng": rngs}
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    with atomic_write(folder / LATEST) as tmp:
        tmp.write_text(json.dumps({"step": step, "file": path.name}))
    log.info("saved checkpoint %s", path)
    return path


def find_checkpoint(resume: str | Path) -> Path:
    """A checkpoint file, or the latest one of a run folder (``output_dir`` or its ``checkpoints``)."""
    resume = Path(resume)
    if resume.is_file():
        return resume
    for folder in (resume / CHECKPOINT_DIR, resume):
        if (folder / LATEST).is_file():
            try:
                path = folder / json.loads((folder / LATEST).read_text())["file"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{folder / LATEST} is not a checkpoint pointer ({e!r}); pass a step-*.pt file "
                                 "with --resume") from None
            if not path.is_file():
                raise FileNotFoundError(f"{folder / LATEST} names {path.name}, which does not exist; pass a "
                                        "step-*.pt file with --resume")
            return path
    raise FileNotFoundError(f"no checkpoint at {resume}: pass a step-*.pt file or a run folder with "
                            f"{CHECKPOINT_DIR}/{LATEST}")


def read_checkpoint(resume: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(path, contents)`` of the checkpoint `find_checkpoint` finds.

    Raises:
        ValueError: the file is truncated, or not a training checkpoint (e.g. an exported adapter).
    """
    path = find_checkpoint(resume)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a training checkpoint, or a truncated one (no complete torch.save archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a readable checkpoint (corrupt?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = [k for k in ("step", "phase", "trainable", "optimizer", "rng")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint (no {', '.join(missing)}); --resume takes a run "
                         f"folder or one of its {CHECKPOINT_DIR}/step-*.pt files")
    return path, ckpt


def load_checkpoint(resume: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    phase: str) -> dict[str, Any]:
    """Restore weights, optimizer and this process's RNG state; returns the checkpoint (``step``, ``epoch``)."""
    path, ckpt = read_checkpoint(resume)
    if ckpt["phase"] != phase:
        raise ValueError(f"{path} is a {ckpt['phase']} checkpoint; it cannot resume a {phase} run")
    expected = set(get_model_state_dict(module, options=_SAVE))
    if set(ckpt["trainable"]) != expected:
        raise ValueError(f"{path} does not match the model's trainable weights (missing "
                         f"{sorted(expected - set(ckpt['trainable']))[:3]}, unexpected "
                         f"{sorted(set(ckpt['trainable']) - expected)[:3]}); resume with the same model config")
    set_model_state_dict(module, ckpt["trainable"], options=_LOAD)
    set_optimizer_state_dict(module, optimizer, ckpt["optimizer"], options=_LOAD)
    rngs = ckpt["rng"]
    if len(rngs) == distributed.world_size():
        set_rng_state(rngs[distributed.rank()])
    else:
        log.warning("%s was written by %d processes, this run has %d: RNG states not restored",
                    path, len(rngs), distributed.world_size())
    log.info("resumed from %s (step %d)", path, ckpt["step"])
    return ckpt


def export(model: ImageBindLLM, output_dir: str | Path) -> dict[str, Path]:
    """Write the trained adapter in the official layout (``adapter.pth`` = ``{'model': ...}``, loadable by the
    official ``llama.load`` and by `imagebind_llm.create_model`) and in ours (``pretrained/``, `save_pretrained`).

    The three files are renamed into place together, ``pretrained/config.json`` last: an interrupted export
    leaves the previous export (or none), never a mix. Call with full (unsharded) weights on the main process.
    """
    output_dir = Path(output_dir)
    official, pretrained = output_dir / EXPORTS[0], make_dir(output_dir / EXPORTS[1], "export folder")
    state = {k: v.detach().cpu().clone() for k, v in official_adapter_state_dict(model).items()}
    with atomic_files(official, pretrained / ADAPTER_FILE, pretrained / CONFIG_FILE) as (official_tmp, adapter, config):
        torch.save({"model": state}, official_tmp)
        write_pretrained(model, adapter, config)
    return {"official": official, "pretrained": pretrained}
