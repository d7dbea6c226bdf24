"""What an ImageBind-LLM model is made of: `AdapterConfig` (what the paper adds to a decoder) and
`ModelSpec` (where every part comes from, the one input of `imagebind_llm.create_model`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagebind_llm.llm.weights.quantize import check_quantize

PHASES = ("pretrain", "finetune")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # ModelSpec.dtype names


@dataclass
class AdapterConfig:
    """What ImageBind-LLM adds to a decoder. Widths of the decoder come from its own `LLMConfig`.

    Attributes:
        feature_dim: ImageBind embedding width (``out_embed_dim``; 1024 for imagebind_huge).
        bind_hidden_dim: SwiGLU width of the bind network; ``None`` means ``4 * llm.dim`` (official).
        bind_blocks: residual blocks in the bind network (3).
        legacy_bind: LayerNorm + biased linears, as in the released ``7B-beta.pth``.
        inject_layers: how many of the last decoder layers receive the visual term; ``None`` = all.
        phase: ``"pretrain"`` (stage 1: bind net, prefix, gates train; no LoRA/bias modules) or
            ``"finetune"`` (stage 2: LoRA + biases + norms train).
        lora_rank: rank of the stage-2 LoRA (16).
        lora_layers: how many of the last decoder layers stage 2 tunes (LoRA, biases, norms); ``None`` = all
            (official). Fewer layers: the backward pass stops at the first tuned one, and the file is smaller.
    """

    feature_dim: int = 1024
    bind_hidden_dim: int | None = None
    bind_blocks: int = 3
    legacy_bind: bool = False
    inject_layers: int | None = None
    phase: str = "finetune"
    lora_rank: int = 16
    lora_layers: int | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PathLike = str | Path


@dataclass(frozen=True)
class ModelSpec:
    """Where each part of a model comes from. Every path may also be a registry name (`imagebind_llm.hub`).

    Attributes:
        name: a named model of `imagebind_llm.hub.MODELS` (``"imagebind-llm-7b"``, ``"demo"``); the other
            fields override its parts. None: built from the fields alone.
        llm: base weights: a Meta folder, a Hugging Face folder or a ``.gguf`` file; None: the embedded
            SmolLM2-135M-Instruct (or, for a LLaMA-7B named model, an error asking for the folder).
        adapter: an official adapter file (``7B.pth``, a path or registry name) or our own folder
            (``save_pretrained``: ``config.json`` + ``adapter.safetensors``).
        imagebind: an official ImageBind checkpoint (path or registry name); None: no encoder unless
            ``demo_encoder`` or an adapter folder that records one.
        imagebind_config: JSON file of ImageBindModel arguments (default: huge, point branch as in the file).
        demo_encoder: a small, randomly initialised ImageBind (``"tiny-random"``; seeded by ``seed``).
        with_encoder: False builds no ImageBind whatever the other fields say (training from features,
            text-only use): saves its memory (4.5 GB in float32 for huge).
        tokenizer: a tokenizer file when it is not beside the base weights.
        phase: ``"finetune"`` or ``"pretrain"``; None: the adapter's or the named model's, else finetune.
        max_seq_len: context length (the official model uses 512).
        lora_rank, inject_layers, lora_layers: the adapter structure (official: 16, every layer, every layer).
        bind_hidden_dim, bind_blocks: the bind network's SwiGLU width (None: ``4 * llm.dim``) and residual blocks
            (official: 3) of a new adapter; our folders record their own.
        feature_dim: the ImageBind width when there is no encoder (default: the adapter file's, else 1024).
        dtype, device: where the model lives.
        quantized: keep a GGUF base's quantised projections in their blocks (None: when the kernel builds).
        quantize: ``"q8"``, ``"q4_1"`` or ``"q4_k"``: quantise the base's embedding, LM head and projections while
            loading them, as llama.cpp's Q8_0 / Q4_1 / Q4_K (a GGUF base's quantised tensors keep their types);
            the adapter, bind network, norms and LoRA stay float. Needs float32 on the CPU.
        seed: seed of the random parts (the demo encoder, the bind network before an adapter is loaded).
    """

    name: str | None = None
    llm: PathLike | None = None
    adapter: PathLike | None = None
    imagebind: PathLike | None = None
    imagebind_config: PathLike | None = None
    demo_encoder: bool = False
    with_encoder: bool = True
    tokenizer: PathLike | None = None
    phase: str | None = None
    max_seq_len: int = 512
    lora_rank: int = 16
    inject_layers: int | None = None
    lora_layers: int | None = None
    bind_hidden_dim: int | None = None
    bind_blocks: int = 3
    feature_dim: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    quantized: bool | None = None
    quantize: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.phase is not None and self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        check_quantize(self.quantize, DTYPES[self.dtype], self.device)
        for field in ("max_seq_len", "lora_rank", "bind_blocks", "bind_hidden_dim"):
            if field == "bind_hidden_dim" and self.bind_hidden_dim is None:
                continue
            if not (isinstance(getattr(self, field), int) and getattr(self, field) >= 1):
                raise ValueError(f"{field} must be a whole number >= 1, got {getattr(self, field)!r}")

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)
