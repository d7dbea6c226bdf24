"""Hugging Face checkpoints (``config.json`` + ``*.safetensors``) <-> our state dict.

Supports ``LlamaForCausalLM`` (LLaMA-1/2/3, SmolLM2, Mistral without sliding window) and
``Qwen2ForCausalLM`` naming, sharded (``model.safetensors.index.json``) or not, tied embeddings and
Llama-3 ``rope_scaling``.

Rotary layout: transformers rotates the two halves of each head (channel ``i`` pairs with
``i + head_dim/2``) while our decoder, like Meta's original code and GGUF, rotates adjacent channels
(``2i`` with ``2i+1``). The rows of the q/k projections (weights and biases) are therefore permuted
per head on the way in (`hf_to_meta_rotary`) and back on the way out (`meta_to_hf_rotary`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import LLMConfig, RopeScaling
from .common import (
    CheckpointMismatchError,
    SourceTensor,
    WeightsFormatError,
    check_complete,
    check_shape,
    expected_shapes,
    invert,
    map_key,
    read_json,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

# Hugging Face key -> our key; "{}" is the layer index.
HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
}
OURS_TO_HF = invert(HF_TO_OURS)

# Buffers some older checkpoints saved; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``[n_heads * head_dim, ...]`` from rotate-half to interleaved-pair layout."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_meta_rotary`: interleaved-pair rows back to rotate-half layout."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rotary_heads(key: str, config: LLMConfig) -> int | None:
    """Number of heads whose rows need the rotary permutation for our key `key` (None: no permutation)."""
    if ".attention.wq." in key:
        return config.n_heads
    if ".attention.wk." in key:
        return config.n_kv_heads
    return None


# ---------------------------------------------------------------------------------------------- config


def _rope_scaling(cfg: Mapping[str, Any], path: Path) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise WeightsFormatError(f"{path}: rope type {rope_type!r} is not supported (only default and llama3)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def config_from_hf(cfg: Mapping[str, Any], path: str | Path = "config.json") -> LLMConfig:
    """Our `LLMConfig` from the dictionary of a Hugging Face ``config.json``.

    Raises:
        WeightsFormatError: a model type or option our decoder does not implement, or a missing field.
    """
    path = Path(path)
    model_type = cfg.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise WeightsFormatError(
            f"{path}: model_type {model_type!r} is not supported; supported: {sorted(_ARCHITECTURES)}"
        )
    unsupported = {
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "attention_bias": model_type != "qwen2" and cfg.get("attention_bias", False),
        "mlp_bias": cfg.get("mlp_bias", False),
        "sliding_window": cfg.get("use_sliding_window", model_type == "mistral") and cfg.get("sliding_window"),
    }
    bad = [f"{k}={cfg.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise WeightsFormatError(f"{path}: options not supported by our decoder: {', '.join(bad)}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise WeightsFormatError(f"{path}: missing required fields {missing}")
    theta, scaling = _rope_scaling(cfg, path)
    n_heads = int(cfg["num_attention_heads"])
    return LLMConfig(
        vocab_size=int(cfg["vocab_size"]),
        dim=int(cfg["hidden_size"]),
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=cfg.get("head_dim"),
        hidden_dim=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attn_bias=model_type == "qwen2",
        name=str(cfg.get("_name_or_path", "")),
    )


def hf_config_dict(config: LLMConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dictionary for `config` (``LlamaForCausalLM``, or ``Qwen2ForCausalLM``
    when the config has q/k/v biases)."""
    model_type = "qwen2" if config.attn_bias else "llama"
    cfg: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if config.rope_scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", **vars(config.rope_scaling)}
    return cfg


# ---------------------------------------------------------------------------------------------- tensors


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (from the index when sharded).

    Raises:
        FileNotFoundError: no safetensors file, or a shard listed in the index is missing.
        WeightsFormatError: an unreadable index.
    """
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsFormatError(f"{index} has no \"weight_map\" object; restore the file shipped with the weights")
        names = sorted(set(map(str, weight_map.values())))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    return files


def _open_safetensors(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        raise WeightsFormatError(f"{file} is not a readable safetensors file ({e})") from e


def _reader(handle: Any, name: str, rows: int, heads: int | None) -> Callable[[int, int], torch.Tensor]:
    """Rows ``[a, b)`` of tensor `name`, q/k rows permuted to our rotary layout (whole heads: see `SourceTensor`)."""
    def read(a: int, b: int) -> torch.Tensor:
        tensor = handle.get_tensor(name) if (a, b) == (0, rows) else handle.get_slice(name)[a:b]
        return hf_to_meta_rotary(tensor, heads * (b - a) // rows) if heads is not None else tensor
    return read


def hf_tensors(path: str | Path) -> tuple[LLMConfig, list[SourceTensor]]:
    """The config and tensors of a Hugging Face model directory (``config.json`` + ``*.safetensors``).

    The files are memory-mapped and every tensor's name and shape checked; no tensor data is read until a
    `SourceTensor` is. q/k projections (weights and biases) come in our rotary layout (`hf_to_meta_rotary`).

    Raises:
        FileNotFoundError: missing ``config.json`` or weights.
        WeightsFormatError: an unreadable file, an unsupported architecture or option.
        CheckpointMismatchError: a tensor that is unknown, missing or shaped unlike the config.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    config = config_from_hf(read_json(path / "config.json"), path / "config.json")
    expected = expected_shapes(config)
    tensors = []
    for file in safetensors_files(path):
        handle = _open_safetensors(file)
        for name in handle.keys():
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_embeddings):
                logger.debug("%s: ignoring %s", file, name)
                continue
            key = map_key(name, HF_TO_OURS)
            if key is None:
                raise CheckpointMismatchError(f"{file}: tensor {name!r} is not a LLaMA-family decoder tensor")
            shape = tuple(handle.get_slice(name).get_shape())
            check_shape(key, shape, expected, f"{file} ({name})")
            heads = _rotary_heads(key, config)
            tensors.append(SourceTensor(key, shape, _reader(handle, name, shape[0], heads),
                                        row_multiple=shape[0] // heads if heads else 1))
    check_complete([t.key for t in tensors], expected, path)
    return config, tensors


def load_hf_state_dict(path: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> tuple[LLMConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face model directory into our config and state-dict naming.

    Tensors are read one at a time (`hf_tensors`), permuted (q/k) and cast to `dtype` on `device`; the result
    is the only copy in memory.

    Args:
        path: directory with ``config.json`` and ``*.safetensors``.
        dtype: floating-point dtype of the returned tensors.
        device: device of the returned tensors.

    Returns:
        ``(config, state_dict)`` in our key naming (no ``output.weight`` when embeddings are tied).

    Raises:
        FileNotFoundError, WeightsFormatError, CheckpointMismatchError: as `hf_tensors`.
    """
    config, tensors = hf_tensors(path)
    return config, {t.key: t.load(dtype, device) for t in tensors}


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: LLMConfig) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face naming and rotary layout (the inverse of `load_hf_state_dict`).

    Raises:
        CheckpointMismatchError: a key that has no Hugging Face name.
    """
    out = {}
    for key, tensor in state.items():
        name = map_key(key, OURS_TO_HF)
        if name is None:
            raise CheckpointMismatchError(f"tensor {key!r} has no Hugging Face name")
        heads = _rotary_heads(key, config)
        out[name] = (meta_to_hf_rotary(tensor, heads) if heads is not None else tensor).contiguous()
    return out


def save_hf(path: str | Path, state: Mapping[str, torch.Tensor], config: LLMConfig) -> None:
    """Write `state` (our naming) as a Hugging Face directory: ``config.json`` + ``model.safetensors``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_state = {k: v for k, v in to_hf_state_dict(state, config).items()
                if not (config.tie_embeddings and k == "lm_head.weight")}
    save_file(hf_state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
