"""Building ImageBind-LLM models: from the official release, from our own folders, or the embedded demo.

Resolution is explicit: every path is given by the caller; nothing is inferred from folder names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from imagebind_llm.encoders import ImageBind, ImageBindConfig, load_official as load_official_encoder
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.tokenizer import load_tokenizer
from imagebind_llm.llm.weights import load_llm
from imagebind_llm.llm.weights.meta import meta_shards
from imagebind_llm.model.convert import CheckpointMismatchError, is_legacy_bind, read_adapter_file
from imagebind_llm.model.imagebind_llm import AdapterConfig, ImageBindLLM

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BASE_MARKER = "imagebind_llm_base.json"  # written by `merge_delta` next to a merged base

# A small ImageBind (official architecture, reduced widths/depths) for the embedded demo and smoke runs;
# its output width is the released 1024 so the bind network has its real input size.
DEMO_ENCODER = dict(
    out_embed_dim=1024, vision_embed_dim=48, vision_num_blocks=2, vision_num_heads=4,
    audio_embed_dim=32, audio_num_blocks=2, audio_num_heads=4, text_embed_dim=16, text_num_blocks=2,
    text_num_heads=2, depth_embed_dim=24, depth_num_blocks=2, depth_num_heads=4, thermal_embed_dim=32,
    thermal_num_blocks=2, thermal_num_heads=4, imu_embed_dim=32, imu_num_blocks=2, imu_num_heads=4,
    point_depth=2, point_num_group=64,
)


def _encoder(imagebind: nn.Module | str | Path | None, config: ImageBindConfig | str | Path | None,
             dtype: torch.dtype,
             device: torch.device | str) -> nn.Module | None:
    if imagebind is None or isinstance(imagebind, nn.Module):
        return imagebind
    return load_official_encoder(imagebind, config, dtype=dtype, device=device)


def _warn_if_vanilla_base(llm_path: Path, adapter: Mapping[str, torch.Tensor], llm_config: LLMConfig) -> None:
    stage2 = any("lora" in k for k in adapter)
    llama_7b = LLMConfig.from_name("llama-7b")
    if stage2 and (llm_config.dim, llm_config.n_layers) == (llama_7b.dim, llama_7b.n_layers) \
            and not (llm_path / BASE_MARKER).is_file():
        logger.warning(
            "the released 7B.pth was fine-tuned on Open-Chinese-LLaMA-7B; on vanilla LLaMA-7B it answers with "
            "meaningless text. Build the base with `imagebind-llm merge-delta --base llama_dir/7B "
            "--delta 7B_chinese_delta --out llama_dir/7B_chinese` and load that (%s has no %s marker)",
            llm_path, BASE_MARKER)


def from_official(llm_path: str | Path | None, adapter: str | Path | Mapping[str, torch.Tensor] | None = None,
                  imagebind: nn.Module | str | Path | None = None, *, tokenizer: str | Path | None = None,
                  phase: str = "finetune", imagebind_config: ImageBindConfig | str | Path | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  max_seq_len: int = 512, lora_rank: int = 16, inject_layers: int | None = None,
                  feature_dim: int | None = None, quantized: bool | None = None) -> ImageBindLLM:
    """The released ImageBind-LLM: base LLM first, then the adapter file, as the official ``llama.load``.

    Args:
        llm_path: base weights: a Meta folder (``params.json`` + ``consolidated.*.pth``, e.g.
            ``llama_dir/7B_chinese``), a Hugging Face folder or a ``.gguf`` file; None for the embedded SmolLM2.
        adapter: ``7B.pth`` / ``7B-pretrained.pth`` / ``7B-beta.pth`` (``{'model': ...}``) or its state dict.
        imagebind: an encoder instance, or an official checkpoint (``imagebind_w3D.pth`` or Meta's
            ``imagebind_huge.pth``); None for a model without media.
        tokenizer: a ``tokenizer.model``/``tokenizer.json`` path when it is not beside the weights.
        phase: ``"finetune"`` (stage-2 structure, for ``7B.pth``) or ``"pretrain"``.
        imagebind_config: encoder configuration, or a JSON file of ImageBindModel arguments; by default huge,
            with the point branch iff the file has one.
        max_seq_len: context length (the official model uses 512).
        lora_rank, inject_layers: the adapter structure (see `AdapterConfig`; official: 16, every layer).
        feature_dim: the ImageBind width when there is no encoder (default: the adapter file's, else 1024).
        quantized: keep a GGUF base's quantised projections in their blocks (see `load_gguf`).
    """
    loaded = load_llm(llm_path, dtype=dtype, device=device, quantized=quantized)
    loaded.model.config.max_seq_len = max_seq_len
    official = None if adapter is None else (dict(adapter) if isinstance(adapter, Mapping) else read_adapter_file(adapter))
    encoder = _encoder(imagebind, imagebind_config, dtype, device)
    if encoder is not None:
        feature_dim = encoder.config.out_embed_dim
    elif feature_dim is None and official is not None and "image_bind_proj.weight" in official:
        feature_dim = official["image_bind_proj.weight"].shape[1]
    config = AdapterConfig(feature_dim=feature_dim or AdapterConfig().feature_dim, phase=phase, lora_rank=lora_rank,
                           inject_layers=inject_layers,
                           legacy_bind=is_legacy_bind(official) if official is not None else False)
    model = ImageBindLLM(loaded.model, encoder, config,
                         tokenizer=load_tokenizer(tokenizer) if tokenizer is not None else loaded.tokenizer)
    model.to(device=device, dtype=dtype)
    if official is not None:
        _warn_if_vanilla_base(loaded.path, official, loaded.model.config)
        missing = model.load_adapter(official)
        if missing:
            logger.info("adapter file lacks %d tensors (kept at init): %s", len(missing), missing[:5])
    return model.eval()


def build_default(*, phase: str = "finetune", dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", seed: int = 0) -> ImageBindLLM:
    """The embedded demo: SmolLM2-135M-Instruct + a small random ImageBind, gates at zero.

    Media go through the whole pipeline, but with zero gates they cannot change the answer until
    trained or released adapter weights are loaded.
    """
    loaded = load_llm(None, dtype=dtype, device=device)
    torch.manual_seed(seed)
    encoder = ImageBind(ImageBindConfig.huge(**DEMO_ENCODER)).to(device=device, dtype=dtype).eval()
    model = ImageBindLLM(loaded.model, encoder, AdapterConfig(feature_dim=encoder.config.out_embed_dim, phase=phase),
                         tokenizer=loaded.tokenizer)
    return model.to(device=device, dtype=dtype).eval()


# -------------------------------------------------------------------- our own folder format
def save_pretrained(model: ImageBindLLM, path: str | Path) -> Path:
    """Write ``config.json`` (adapter, LLM and encoder configs) and ``adapter.safetensors`` (our names).

    The base LLM and the encoder weights are not copied: they are frozen and loaded from their own files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().contiguous().cpu() for name in model.adapter_parameter_names()}
    config = {
        "format_version": FORMAT_VERSION,
        "adapter": model.config.to_dict(),
        "llm": model.llm.config.to_dict(),
        "encoder": model.encoder.config.to_dict() if model.encoder is not None else None,
    }
    save_file(tensors, str(path / "adapter.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_pretrained(path: str | Path, llm_path: str | Path | None = None,
                    imagebind: nn.Module | str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> ImageBindLLM:
    """Load a folder written by `save_pretrained` on top of a base LLM (default: the embedded SmolLM2).

    Raises:
        CheckpointMismatchError: the base LLM or the encoder differs in shape from the saved one, or
            adapter tensors are missing/unexpected.
    """
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "adapter.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not an imagebind-llm folder (config.json + adapter.safetensors)")
    saved = json.loads((path / "config.json").read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path}: format_version {saved.get('format_version')} is not {FORMAT_VERSION}")
    loaded = load_llm(llm_path, dtype=dtype, device=device)
    saved_llm = LLMConfig.from_dict(saved["llm"])
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
        if getattr(saved_llm, field) != getattr(loaded.model.config, field):
            raise CheckpointMismatchError(f"{path} was trained on a base with {field}={getattr(saved_llm, field)}, "
                                          f"but {loaded.path} has {getattr(loaded.model.config, field)}; pass its base")
    encoder_config = ImageBindConfig.from_dict(saved["encoder"]) if saved["encoder"] else None
    if imagebind is None and encoder_config is not None:
        encoder = ImageBind(encoder_config).eval()
        logger.warning("no ImageBind weights given: the encoder is randomly initialised")
    else:
        encoder = _encoder(imagebind, encoder_config, dtype, device)
    model = ImageBindLLM(loaded.model, encoder, AdapterConfig(**saved["adapter"]), tokenizer=loaded.tokenizer)
    tensors = load_file(str(path / "adapter.safetensors"))
    expected = set(model.adapter_parameter_names())
    if set(tensors) != expected:
        raise CheckpointMismatchError(f"{path}/adapter.safetensors: missing {sorted(expected - set(tensors))[:5]}, "
                                      f"unexpected {sorted(set(tensors) - expected)[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model.to(device=device, dtype=dtype).eval()


# -------------------------------------------------------------------- Open-Chinese-LLaMA delta
def merge_delta(base: str | Path, delta: str | Path, out: str | Path) -> Path:
    """``out = fp16(base + delta)`` tensor by tensor, as the official ``get_chinese_llama.py`` (rope keys skipped).

    The released ``7B.pth`` adapter needs this base (``7B_chinese`` = LLaMA-7B + Open-Chinese-LLaMA delta).
    Writes ``consolidated.00.pth``, the delta's ``params.json`` and a marker file to ``out``.
    """
    base, delta, out = Path(base), Path(delta), Path(out)
    base_files, delta_files = meta_shards(base), meta_shards(delta)
    if len(base_files) != 1 or len(delta_files) != 1:
        raise ValueError(f"merge_delta expects single-shard 7B folders; got {len(base_files)} and {len(delta_files)}")
    original = torch.load(base_files[0], map_location="cpu", mmap=True, weights_only=True)
    diff = torch.load(delta_files[0], map_location="cpu", mmap=True, weights_only=True)
    merged = {}
    for key, tensor in original.items():
        if "rope" in key:
            continue
        if key not in diff or diff[key].shape != tensor.shape:
            raise CheckpointMismatchError(f"delta {delta_files[0]} has no tensor {key!r} of shape {tuple(tensor.shape)}")
        merged[key] = (tensor.float() + diff[key].float()).half()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(merged, out / "consolidated.00.pth")
    params = delta / "params.json" if (delta / "params.json").is_file() else base / "params.json"
    (out / "params.json").write_text(params.read_text())
    (out / BASE_MARKER).write_text(json.dumps({"base": str(base), "delta": str(delta)}, indent=2))
    return out
