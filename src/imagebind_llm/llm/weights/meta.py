"""Meta's original LLaMA layout: ``params.json`` + ``consolidated.NN.pth`` (one file per model-parallel rank).

The key names are ours already. With several shards, each tensor is merged along the axis its layer
was split on by Meta's model-parallel code: column-parallel layers (``wq``/``wk``/``wv``, ``w1``/``w3``,
``output``) are concatenated on dim 0, row-parallel layers (``wo``, ``w2``) and the parallel embedding
``tok_embeddings`` on dim 1; norms are replicated. ``rope.freqs`` buffers (precomputed RoPE) are ignored, and
so are ``layers.N.attention.gate`` tensors, which the official ImageBind-LLM code saves along with a base
model although they belong to (and are always overwritten by) the adapter checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from imagebind_llm.hub import StateDictError, read_state_dict

from ..config import LLMConfig
from .common import (
    CheckpointMismatchError, SourceTensor, WeightsFormatError, check_complete, check_shape, expected_shapes, read_json,
)

logger = logging.getLogger(__name__)

SHARD_GLOB = "consolidated.*.pth"
# Precomputed RoPE buffers (`rope.freqs`; LLaMA-1 files: `layers.0.attention.inner_attention.rope.freqs`) and
# the gates ImageBind-LLM saves with its base model.
_IGNORED = re.compile(r"^(.*rope\.freqs|layers\.\d+\.attention\.gate)$")
_DIM0 = (".wq.weight", ".wk.weight", ".wv.weight", ".w1.weight", ".w3.weight", "output.weight")
_DIM1 = (".wo.weight", ".w2.weight", "tok_embeddings.weight")

# Llama-3.1 params.json says `use_scaled_rope: true`; its context length is not in the file.
_SCALED_ROPE_MAX_SEQ_LEN = 131072


def shard_axis(key: str) -> int | None:
    """The axis along which `key` is split across model-parallel shards; None for replicated tensors."""
    if key.endswith(_DIM0):
        return 0
    if key.endswith(_DIM1):
        return 1
    return None


def meta_shards(path: str | Path) -> list[Path]:
    """The ``consolidated.NN.pth`` files of a Meta checkpoint directory, in rank order.

    Raises:
        FileNotFoundError: none found.
    """
    files = sorted(Path(path).glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"no {SHARD_GLOB} file in {path}")
    return files


def config_from_params(params: Mapping[str, Any], vocab_size: int, path: str | Path = "params.json",
                       max_seq_len: int | None = None) -> LLMConfig:
    """Our `LLMConfig` from a Meta ``params.json`` dictionary.

    Args:
        params: the file's content.
        vocab_size: used when ``params["vocab_size"]`` is missing or -1 (LLaMA-1 files), e.g. the
            embedding's row count.
        path: the file, for messages.
        max_seq_len: context length (not stored by Meta); defaults to 131072 for Llama-3.1 files
            (``use_scaled_rope``) and `LLMConfig`'s default otherwise.

    Raises:
        WeightsFormatError: a required field is missing or unknown.
    """
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise WeightsFormatError(f"{path}: unknown fields {unknown}; known: {sorted(known)}")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise WeightsFormatError(f"{path}: missing required fields {missing}")
    scaled = bool(params.get("use_scaled_rope", False))
    kwargs: dict[str, Any] = dict(
        vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size,
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling={} if scaled else None,  # Llama-3.1's fixed scaling: RopeScaling's defaults
    )
    seq = max_seq_len or params.get("max_seq_len") or (_SCALED_ROPE_MAX_SEQ_LEN if scaled else None)
    if seq:
        kwargs["max_seq_len"] = int(seq)
    return LLMConfig(**kwargs)


def _reader(key: str, parts: list[torch.Tensor],
            source: Path) -> tuple[tuple[int, ...], Callable[[int, int], torch.Tensor]]:
    """The merged shape of one tensor's per-shard `parts`, and a reader of its rows (see `SourceTensor`)."""
    if len(parts) == 1:
        return tuple(parts[0].shape), lambda a, b: parts[0][a:b]
    axis = shard_axis(key)
    if axis is None:
        if any(p.shape != parts[0].shape for p in parts):
            raise CheckpointMismatchError(f"{source}: replicated tensor {key!r} differs in shape across shards")
        return tuple(parts[0].shape), lambda a, b: parts[0][a:b]
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    if axis == 1:  # every shard holds some columns of every row
        return tuple(shape), lambda a, b: torch.cat([p[a:b] for p in parts], dim=1)
    starts = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    return tuple(shape), lambda a, b: torch.cat([p[max(a - s, 0):max(b - s, 0)] for p, s in zip(parts, starts)])


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(file, what="Meta checkpoint shard", unwrap=False)
    except StateDictError as e:
        raise WeightsFormatError(f"{e}; re-save it with torch.save(state_dict, path)") from e


def meta_tensors(path: str | Path, max_seq_len: int | None = None) -> tuple[LLMConfig, list[SourceTensor]]:
    """The config and tensors of a Meta checkpoint directory (``params.json`` + ``consolidated.NN.pth``).

    Shards are memory-mapped (``torch.load(mmap=True, weights_only=True)``) and every tensor's shape is checked;
    no tensor data is read until a `SourceTensor` is.

    Raises:
        FileNotFoundError: missing ``params.json`` or shards.
        WeightsFormatError: bad ``params.json``.
        CheckpointMismatchError: a tensor that is unknown, missing, or shaped unlike ``params.json`` says.
    """
    path = Path(path)
    params_file = path / "params.json"
    if not params_file.is_file():
        raise FileNotFoundError(f"{path} has no params.json")
    params = read_json(params_file)
    files = meta_shards(path)
    shards = [_load_shard(f) for f in files]
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointMismatchError(f"{files[0]}: no 'tok_embeddings.weight'; not a Meta LLaMA checkpoint")
    config = config_from_params(params, shards[0]["tok_embeddings.weight"].shape[0], params_file, max_seq_len)
    expected = expected_shapes(config)
    tensors = []
    for key in shards[0]:
        if _IGNORED.match(key):
            logger.debug("%s: ignoring %s", files[0], key)
            continue
        missing_in = [str(f) for f, s in zip(files, shards) if key not in s]
        if missing_in:
            raise CheckpointMismatchError(f"tensor {key!r} of {files[0]} is missing from {missing_in}")
        shape, read = _reader(key, [s[key] for s in shards], files[0])
        check_shape(key, shape, expected, files[0] if len(files) == 1 else path)
        tensors.append(SourceTensor(key, shape, read))
    check_complete([t.key for t in tensors], expected, path)
    return config, tensors


def load_meta_state_dict(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                         max_seq_len: int | None = None) -> tuple[LLMConfig, dict[str, torch.Tensor]]:
    """Read a Meta checkpoint directory (``params.json`` + ``consolidated.NN.pth``) into our config and state dict.

    Shards are memory-mapped; tensors are merged and cast one at a time (`meta_tensors`), so the result is the
    only full copy (none at all when the file's dtype is `dtype` on CPU: the tensors then stay memory-mapped).

    Args:
        path: the directory (e.g. ``llama_dir/7B``).
        dtype, device: of the returned floating-point tensors.
        max_seq_len: context length of the returned config, see `config_from_params`.

    Returns:
        ``(config, state_dict)`` in our naming.

    Raises:
        FileNotFoundError, WeightsFormatError, CheckpointMismatchError: as `meta_tensors`.
    """
    config, tensors = meta_tensors(path, max_seq_len)
    return config, {t.key: t.load(dtype, device) for t in tensors}


def params_dict(config: LLMConfig) -> dict[str, Any]:
    """A Meta ``params.json`` dictionary for `config` (``hidden_dim`` must follow Meta's SwiGLU rule)."""
    rule = LLMConfig(**{**config.to_dict(), "hidden_dim": None})
    if rule.hidden_dim != config.hidden_dim:
        raise ValueError(f"hidden_dim={config.hidden_dim} cannot be expressed in params.json "
                         f"(multiple_of={config.multiple_of}, ffn_dim_multiplier={config.ffn_dim_multiplier} "
                         f"give {rule.hidden_dim})")
    if config.attn_bias or config.tie_embeddings:
        raise ValueError("Meta's layout has no q/k/v biases and no tied embeddings")
    params = dict(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                  vocab_size=config.vocab_size, multiple_of=config.multiple_of, norm_eps=config.norm_eps,
                  rope_theta=config.rope_theta)
    if config.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    if config.rope_scaling is not None:
        params["use_scaled_rope"] = True
    return params


def save_meta(path: str | Path, state: Mapping[str, torch.Tensor], config: LLMConfig, *, n_shards: int = 1) -> None:
    """Write `state` in Meta's layout, split into `n_shards` model-parallel files (the inverse of loading)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, tensor in state.items():
        axis = shard_axis(key)
        if axis is None:
            parts = [tensor] * n_shards
        else:
            if tensor.shape[axis] % n_shards:
                raise ValueError(f"{key} {list(tensor.shape)} does not split into {n_shards} shards on dim {axis}")
            parts = tensor.chunk(n_shards, dim=axis)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    for rank, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    (path / "params.json").write_text(json.dumps(params_dict(config)))
