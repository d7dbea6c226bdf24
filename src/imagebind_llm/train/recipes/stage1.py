"""Stage 1, image-text alignment (official ``main_pretrain.py``).

Trains the bind network, the prefix queries and the zero-initialised gates on image-caption pairs; the
LLM and ImageBind stay frozen. With ``data.features`` the images were encoded once beforehand
(`imagebind_llm.train.features`) and ImageBind is not even loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagebind_llm.train import distributed
from imagebind_llm.train.data import TrainDataset, image_sources, read_examples
from imagebind_llm.train.features import FeatureStore
from imagebind_llm.train.loop import TrainResult, build_model, train

PHASE = "pretrain"


def run(config: dict[str, Any], resume: str | Path | None = None) -> TrainResult:
    """Run stage 1 as configured (see ``configs/stage1.yaml``)."""
    data, train_cfg = config["data"], config["train"]
    device = distributed.setup(train_cfg["device"])
    examples = read_examples(data["train"], data["image_root"])
    features = FeatureStore(data["features"], sources=image_sources(examples)) if data["features"] else None
    torch.manual_seed(train_cfg["seed"])  # initialisations of the new adapter weights
    model = build_model(config, PHASE, need_encoder=features is None,
                        feature_dim=features.dim if features is not None else None)
    dataset = TrainDataset(examples, model.tokenizer, data["max_words"], caption_prompt=data["prompt"],
                           text_only=data["text_only"], features=features, seed=train_cfg["seed"])
    return train(config, model, dataset, device, resume)
