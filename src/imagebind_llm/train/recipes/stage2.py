"""Stage 2, instruction tuning (official ``main_finetune.py``).

Starts from the stage-1 adapter (``model.adapter``) and trains LoRA, the decoder biases and the norms
on instruction data (Alpaca, LLaVA with every turn, MiniGPT-4 detail captions, chat). Text-only samples
run the plain LLM (``data.text_only: no_injection``) unless the official all-zero dummy image is
asked for (``zero_image``). Unlike the official dataset, Alpaca instructions are not rendered as
Python tuples and LLaVA conversations keep every turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagebind_llm.train import distributed
from imagebind_llm.train.data import DETAIL_PROMPT, TrainDataset, read_examples
from imagebind_llm.train.loop import TrainResult, build_model, train

PHASE = "finetune"


def run(config: dict[str, Any], resume: str | Path | None = None) -> TrainResult:
    """Run stage 2 as configured (see ``configs/stage2.yaml``)."""
    data, train_cfg = config["data"], config["train"]
    if data["features"]:
        raise ValueError("data.features is a stage-1 option (stage-2 data mixes text-only samples); unset it")
    device = distributed.setup(train_cfg["device"])
    examples = read_examples(data["train"], data["image_root"])
    needs_images = data["text_only"] == "zero_image" or any(ex.image is not None for ex in examples)
    need_encoder = needs_images or bool(config["model"]["imagebind"])
    torch.manual_seed(train_cfg["seed"])  # initialisations of the new adapter weights
    model = build_model(config, PHASE, need_encoder=need_encoder, feature_dim=None if need_encoder else 1024)
    dataset = TrainDataset(examples, model.tokenizer, data["max_words"], caption_prompt=DETAIL_PROMPT,
                           text_only=data["text_only"], seed=train_cfg["seed"])
    return train(config, model, dataset, device, resume)
