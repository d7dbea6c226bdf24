"""Stage 2, instruction tuning (official ``main_finetune.py``).

Starts from the stage-1 adapter (``model.adapter``) and trains LoRA, the decoder biases and the norms
on instruction data (Alpaca, LLaVA with every turn, MiniGPT-4 detail captions, chat). Text-only samples
run the plain LLM (``data.text_only: no_injection``) unless the official all-zero dummy image is
asked for (``zero_image``). Unlike the official dataset, Alpaca instructions are not rendered as
Python tuples and LLaVA conversations keep every turn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagebind_llm.cache.shards import encoder_name
from imagebind_llm.train import distributed
from imagebind_llm.train.config import TrainConfig
from imagebind_llm.train.data import DETAIL_PROMPT, TrainDataset, read_examples
from imagebind_llm.train.loop import TrainResult, build_model, cache_retrieve, train

PHASE = "finetune"


def run(config: TrainConfig, resume: str | Path | None = None, *, overwrite: bool = False) -> TrainResult:
    """Run stage 2 as configured (see ``configs/base.yaml`` and ``configs/stage2.yaml``); ``resume`` and
    ``overwrite`` as `imagebind_llm.train.loop.train` takes them."""
    data = config.data
    if data.features:
        raise ValueError("data.features is a stage-1 option (stage-2 data mixes text-only samples); unset it")
    device = distributed.setup(config.train.device)
    examples = read_examples(data.train, data.image_root)
    needs_images = data.text_only == "zero_image" or any(ex.image is not None for ex in examples)
    torch.manual_seed(config.train.seed)  # initialisations of the new adapter weights
    model = build_model(config.model, PHASE, need_encoder=needs_images or bool(config.model.imagebind))
    dataset = TrainDataset(examples, model.tokenizer, data.max_words, caption_prompt=DETAIL_PROMPT,
                           text_only=data.text_only, seed=config.train.seed)
    retrieve = cache_retrieve(config.model, model, encoder_name(config.model.imagebind_config))
    return train(config, model, dataset, device, resume, retrieve=retrieve, overwrite=overwrite)
