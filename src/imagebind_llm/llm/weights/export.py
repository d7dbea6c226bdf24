"""Write a base LLM (a Meta or Hugging Face directory) as a GGUF file that llama.cpp and `load_llm` both read.

The file is what llama.cpp's own converter writes for a ``llama`` model, with the tensors quantised here:

* architecture ``llama`` and its hyper-parameters; q/k rows in Meta's interleaved rotary layout, which is
  ours (the Hugging Face loader has permuted them already) and what llama.cpp expects for ``llama``;
* the token embedding, the LM head and the projections as Q4_1, Q8_0 or Q4_K blocks (`quantize`, bit-exact
  with llama.cpp's reference quantisers; Q4_K rows that are not whole super-blocks fall back to Q4_1), or
  float16 for ``f16``; norms and other 1-D tensors stay float32, as llama.cpp keeps them. (``llama-quantize``
  would also keep the LM head in Q6_K; here every quantised tensor has the requested type, so the file holds
  exactly the blocks ``load_llm(model, quantize=...)`` builds.)
* the tokenizer: a SentencePiece ``tokenizer.model`` as ``tokenizer.ggml.model = "llama"`` (pieces, scores,
  token types), or a byte-level BPE ``tokenizer.json`` as ``"gpt2"`` (tokens, merges, and the
  ``tokenizer.ggml.pre`` type, among those both readers know, that splits text as the file does), padded to
  the model's vocabulary with unused ``[PADn]`` tokens; BOS / EOS, whether to add them, and the chat template.

The file is written atomically: a failed export leaves no partial ``.gguf``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from imagebind_llm.hub.files import atomic_write, make_dir, refuse_overwrite

from ..config import LLMConfig
from ..tokenizer import BaseTokenizer, HFTokenizer, SentencePieceTokenizer
from . import GGUF_BASE_KEY, base_marker, detect_format, read_checkpoint
from .common import SourceTensor, expected_shapes, invert, map_key
from .gguf import GGUF_TO_OURS
from .quantize import GGUF_TYPES, QuantizeReport, block_type, quantize_tensor

log = logging.getLogger(__name__)

EXPORT_TYPES = ("q4_1", "q8_0", "q4_k", "f16")  # --type: GGUF's names
_QTYPES = {"q4_1": "q4_1", "q8_0": "q8", "q4_k": "q4_k"}  # --type -> quantize
_FILE_TYPES = {"q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S, "f16": gguf.LlamaFileType.MOSTLY_F16}
_OURS_TO_GGUF = invert(GGUF_TO_OURS)
T = gguf.TokenType
# Byte-level pre-tokenizers that llama.cpp and our GGUF tokenizer both implement, tried in turn on `_PROBE`
# against the tokenizer.json.
_BPE_PRE_TYPES = ("llama-bpe", "qwen2", "smollm", "gpt-2")
_PROBE = ("Hello world! It's 2024, isn't it?\n\n  3.14159 ... 1234567 \t\tÅÆ 🚀 你好 ```\"\"\" ......!!!???\n"
          "I've been 'told he's there, 'RE you sure? 'We'Ve a'lL 11 222 3333 44444 x=1+2 ÉCOLE niño")


def export_gguf(model: str | Path, out: str | Path, *, gguf_type: str = "q4_1", overwrite: bool = False) -> Path:
    """Write the base LLM at `model` (a Meta or Hugging Face directory) to the GGUF file `out`.

    Args:
        model: what `load_llm` reads, but not a GGUF file.
        out: the ``.gguf`` file to write (its folder is created).
        gguf_type: ``"q4_1"``, ``"q8_0"``, ``"q4_k"`` or ``"f16"`` for the projections, embedding and LM head.
        overwrite: replace an existing `out`.

    Returns:
        `out`.

    Raises:
        FileExistsError: `out` exists and not `overwrite`.
        FileNotFoundError, WeightsFormatError, CheckpointMismatchError: as `load_llm`.
        ValueError: an unknown `gguf_type`, a GGUF input, or a model or tokenizer GGUF cannot describe.
    """
    if gguf_type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(EXPORT_TYPES)}")
    model, out = Path(model), Path(out)
    refuse_overwrite(out, overwrite=overwrite)
    fmt = detect_format(model)
    if fmt == "gguf":
        raise ValueError(f"{model} is a GGUF file already: export its Meta or Hugging Face folder, or change its "
                         "types with llama.cpp's llama-quantize")
    tokenizer, config, tensors = read_checkpoint(model, fmt)
    if config.rope_scaling is not None:
        raise ValueError(f"{model} uses Llama-3 RoPE frequency scaling, which GGUF stores as a rope_freqs tensor our "
                         "loader does not read; load the folder itself (with --quantize) instead")
    vocabulary = _vocabulary(tokenizer, config.vocab_size, model)
    order = {key: i for i, key in enumerate(expected_shapes(config))}
    tensors = sorted(tensors, key=lambda t: order[t.key])  # llama.cpp's order: embedding, blocks, norm, head
    types = {t.key: _tensor_type(t, gguf_type) for t in tensors}
    report = QuantizeReport(str(out))
    make_dir(out.parent)
    with atomic_write(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            _add_hyper_parameters(writer, config, model, gguf_type)
            if (marker := base_marker(model)) is not None:  # a merged base stays recognisable as one
                writer.add_string(GGUF_BASE_KEY, marker)
            for key, value in vocabulary.items():
                writer.add_key_value(key, *value)
            for t in tensors:
                writer.add_tensor_info(map_key(t.key, _OURS_TO_GGUF), *_tensor_info(t, types[t.key]))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:  # one tensor in memory at a time
                writer.write_tensor_data(_tensor_data(t, types[t.key], report))
        finally:
            writer.close()
    report.log_summary()
    log.info("wrote %s (%s, %d tensors, %.2f GB)", out, gguf_type, len(tensors), out.stat().st_size / 1e9)
    return out


def _tensor_type(tensor: SourceTensor, export_type: str) -> gguf.GGMLQuantizationType:
    if len(tensor.shape) != 2:
        return gguf.GGMLQuantizationType.F32
    if export_type == "f16":
        return gguf.GGMLQuantizationType.F16
    qtype = block_type(tensor.key, tensor.shape, _QTYPES[export_type])
    return GGUF_TYPES[qtype] if qtype is not None else gguf.GGMLQuantizationType.F16


def _tensor_info(tensor: SourceTensor, kind: gguf.GGMLQuantizationType) -> tuple[Any, ...]:
    """`GGUFWriter.add_tensor_info`'s arguments after the name: shape (bytes for blocks), dtype, size, raw type."""
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
        return tensor.shape, np.dtype(dtype), int(np.prod(tensor.shape)) * np.dtype(dtype).itemsize
    values, size = gguf.GGML_QUANT_SIZES[kind]
    shape = (tensor.shape[0], tensor.shape[1] // values * size)
    return shape, np.dtype(np.uint8), shape[0] * shape[1], kind


def _tensor_data(tensor: SourceTensor, kind: gguf.GGMLQuantizationType, report: QuantizeReport) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F32:
        return tensor.load(torch.float32).contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.F16:
        return tensor.load(torch.float16).contiguous().numpy()
    qtype = next(q for q, t in GGUF_TYPES.items() if t == kind)
    return quantize_tensor(tensor, qtype, report).numpy()


def _add_hyper_parameters(writer: gguf.GGUFWriter, config: LLMConfig, model: Path, export_type: str) -> None:
    writer.add_name(config.name or model.name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    if config.head_dim != config.dim // config.n_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(_FILE_TYPES[export_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------- tokenizer

_Value = tuple[Any, gguf.GGUFValueType] | tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType]
K = gguf.Keys.Tokenizer
V = gguf.GGUFValueType


def _vocabulary(tokenizer: BaseTokenizer, vocab_size: int, model: Path) -> dict[str, _Value]:
    """The ``tokenizer.*`` GGUF keys of `tokenizer`, padded to `vocab_size` tokens: ``{key: (value, type[, item])}``."""
    if isinstance(tokenizer, HFTokenizer) and not _is_byte_level(tokenizer):
        spm = model / "tokenizer.model"
        if not spm.is_file():
            raise ValueError(f"{model}/tokenizer.json is neither a byte-level BPE nor backed by a tokenizer.model; "
                             "put the model's SentencePiece tokenizer.model next to it")
        tokenizer = SentencePieceTokenizer(spm, chat_template=tokenizer.chat_template)
    if isinstance(tokenizer, SentencePieceTokenizer):
        md = _sentencepiece_vocabulary(tokenizer)
    else:
        md = _byte_level_vocabulary(tokenizer, model)
    tokens = md[K.LIST][0]
    for i in range(len(tokens), vocab_size):  # the embedding's extra rows (as llama.cpp's converter pads)
        tokens.append(f"[PAD{i}]")
        md[K.TOKEN_TYPE][0].append(T.UNUSED)
        if K.SCORES in md:
            md[K.SCORES][0].append(-1000.0)
    for key, token_id in ((K.BOS_ID, tokenizer.bos_id), (K.EOS_ID, tokenizer.eos_id)):
        if token_id is not None:
            md[key] = (token_id, V.UINT32)
    md[K.ADD_BOS] = (tokenizer.add_bos, V.BOOL)
    md[K.ADD_EOS] = (tokenizer.add_eos, V.BOOL)
    if tokenizer.chat_template:
        md[K.CHAT_TEMPLATE] = (tokenizer.chat_template, V.STRING)
    return md


def _sentencepiece_vocabulary(tokenizer: SentencePieceTokenizer) -> dict[str, _Value]:
    """Pieces, scores and types as llama.cpp's converter reads them from the SentencePiece processor."""
    sp = tokenizer.sp
    n = sp.get_piece_size()

    def token_type(i: int) -> int:
        if sp.is_unknown(i):
            return T.UNKNOWN
        return T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL

    md: dict[str, _Value] = {
        K.MODEL: ("llama", V.STRING),
        K.PRE: ("default", V.STRING),
        K.LIST: ([sp.id_to_piece(i) for i in range(n)], V.ARRAY, V.STRING),
        K.SCORES: ([sp.get_score(i) for i in range(n)], V.ARRAY, V.FLOAT32),
        K.TOKEN_TYPE: ([token_type(i) for i in range(n)], V.ARRAY, V.INT32),
        # add_dummy_prefix, which the processor applies but does not expose
        K.ADD_PREFIX: (sp.encode_as_pieces("a")[0].startswith("\u2581"), V.BOOL),
    }
    for key, token_id in ((K.UNK_ID, sp.unk_id()), (K.PAD_ID, sp.pad_id())):
        if token_id >= 0:
            md[key] = (token_id, V.UINT32)
    return md


def _is_byte_level(tokenizer: HFTokenizer) -> bool:
    spec = json.loads(tokenizer.tk.to_str())
    return spec["model"]["type"] == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel"


def _byte_level_vocabulary(tokenizer: HFTokenizer, model: Path) -> dict[str, _Value]:
    spec = json.loads(tokenizer.tk.to_str())
    by_id = {i: t for t, i in tokenizer.tk.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.tk.get_added_tokens_decoder()
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    types = [(T.CONTROL if added[i].special else T.USER_DEFINED) if i in added
             else T.NORMAL if i in by_id else T.UNUSED for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    md: dict[str, _Value] = {
        K.MODEL: ("gpt2", V.STRING),
        K.LIST: (tokens, V.ARRAY, V.STRING),
        K.TOKEN_TYPE: (types, V.ARRAY, V.INT32),
        K.MERGES: (merges, V.ARRAY, V.STRING),
    }
    md[K.PRE] = (_pre_tokenizer(tokenizer, {k: v[0] for k, v in md.items()}, model), V.STRING)
    return md


def _pre_tokenizer(tokenizer: HFTokenizer, metadata: dict[str, Any], model: Path) -> str:
    """The first of `_BPE_PRE_TYPES` under which the GGUF vocabulary tokenises `_PROBE` as `tokenizer` does."""
    expected = tokenizer.encode(_PROBE, bos=False)
    for pre in _BPE_PRE_TYPES:
        rebuilt = HFTokenizer.from_gguf_metadata({**metadata, K.PRE: pre})
        if rebuilt.encode(_PROBE, bos=False) == expected:
            return pre
    kind = (json.loads(tokenizer.tk.to_str()).get("pre_tokenizer") or {}).get("type")
    raise ValueError(f"{model}: the tokenizer's pre-tokenizer ({kind}) splits text unlike every GGUF pre-tokenizer "
                     f"type both llama.cpp and imagebind-llm read ({', '.join(_BPE_PRE_TYPES)}); this model cannot be "
                     "exported to GGUF here")
