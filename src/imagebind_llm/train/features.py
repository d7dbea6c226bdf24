"""Frozen-encoder feature caching: encode every training image with ImageBind once, train from the features.

ImageBind is frozen in both stages, so its output for an image only changes with the augmentation.
Pre-extracting the features (deterministic inference preprocessing: resize + centre crop, instead of the
random resized crop with scale 0.9-1.0) removes the 1.2B-parameter encoder from the training step.

The store is the shard layout of `imagebind_llm.cache.build` (``out/features/plan.json`` + one
``shard-NNNNN.npy`` with its ``.done`` marker per shard), so extraction is sharded, resumable (finished
shards are skipped) and splits across ``torchrun`` processes. Rows are L2-normalised ImageBind
embeddings in the order of the training examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imagebind_llm.cache.build import FEATURES_DIR, PLAN_FILE, extract_features, shard_path
from imagebind_llm.train.data import encode_images_for_features


@torch.no_grad()
def extract(encoder: nn.Module, sources: Sequence[str], out: str | Path, *, shard_size: int = 4096,
            batch_size: int = 32, encoder_name: str = "imagebind", rank: int | None = None,
            world_size: int | None = None, progress: bool = True) -> list[int]:
    """Encode ``sources`` (image paths or ``shard.tar::member``) with the ImageBind ``encoder`` into the store
    ``out``; returns the shards this call encoded (finished shards are skipped, so re-running resumes)."""
    device = next(encoder.parameters()).device

    def encode(batch: list[str]) -> torch.Tensor:
        return F.normalize(encoder({"vision": encode_images_for_features(batch).to(device)})["vision"].float(), dim=-1)

    return extract_features(list(sources), out, encode, encoder=encoder_name, shard_size=shard_size,
                            batch_size=batch_size, rank=rank, world_size=world_size, progress=progress)


class FeatureStore:
    """Read-only, memory-mapped rows ``[D]`` of a finished store, indexed like the training examples.

    Args:
        path: the ``out`` folder given to `extract`.
        sources: when given, must equal the extracted source list (guards against a store built from
            other data or another order).

    Raises:
        FileNotFoundError: no store, or unfinished shards (the message says how to resume).
        ValueError: the store was built for other sources.
    """

    def __init__(self, path: str | Path, sources: Sequence[str] | None = None) -> None:
        features_dir = Path(path) / FEATURES_DIR
        plan_file = features_dir / PLAN_FILE
        if not plan_file.is_file():
            raise FileNotFoundError(f"{path} is not a feature store (no {FEATURES_DIR}/{PLAN_FILE}); create it with "
                                    "`imagebind-llm train extract-features`")
        plan = json.loads(plan_file.read_text())
        self.sources, self.shard_size = plan["sources"], plan["shard_size"]
        if sources is not None and list(sources) != self.sources:
            raise ValueError(f"the feature store {path} was extracted from other images (or another order) than "
                             "data.train; extract again for these files")
        n_shards = -(-len(self.sources) // self.shard_size)
        self.shards = []
        for i in range(n_shards):
            file, marker = shard_path(features_dir, i), shard_path(features_dir, i).with_suffix(".done")
            if not marker.is_file():
                raise FileNotFoundError(f"shard {i} of {path} is unfinished; re-run the extraction to resume it")
            self.shards.append(np.load(file, mmap_mode="r"))
        self.dim = self.shards[0].shape[1]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> np.ndarray:
        shard, row = divmod(index, self.shard_size)
        return self.shards[shard][row]
