"""Stage 1, image-text alignment (official ``main_pretrain.py``).

Trains the bind network, the prefix queries and the zero-initialised gates on image-caption pairs; the
LLM and ImageBind stay frozen. With ``data.features`` the images were encoded once beforehand into a
shard store (``imagebind-llm cache extract``, `imagebind_llm.cache.shards`) and ImageBind is not even
loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagebind_llm.cache.shards import FeatureStore, encoder_name
from imagebind_llm.train import distributed
from imagebind_llm.train.config import TrainConfig
from imagebind_llm.train.data import TrainDataset, image_sources, read_examples
from imagebind_llm.train.loop import TrainResult, build_model, cache_retrieve, train

PHASE = "pretrain"


def run(config: TrainConfig, resume: str | Path | None = None, *, overwrite: bool = False) -> TrainResult:
    """Run stage 1 as configured (see ``configs/base.yaml`` and ``configs/stage1.yaml``); ``resume`` and
    ``overwrite`` as `imagebind_llm.train.loop.train` takes them."""
    data = config.data
    device = distributed.setup(config.train.device)
    examples = read_examples(data.train, data.image_root)
    features = FeatureStore(data.features, sources=image_sources(examples)) if data.features else None
    torch.manual_seed(config.train.seed)  # initialisations of the new adapter weights
    if features is None:
        model = build_model(config.model, PHASE, need_encoder=True)
    else:
        model = build_model(config.model, PHASE, need_encoder=False, feature_dim=features.dim)
    encoder = features.encoder if features is not None else encoder_name(config.model.imagebind_config)
    dataset = TrainDataset(examples, model.tokenizer, data.max_words, caption_prompt=data.prompt,
                           text_only=data.text_only, features=features, seed=config.train.seed)
    return train(config, model, dataset, device, resume, retrieve=cache_retrieve(config.model, model, encoder),
                 overwrite=overwrite)
