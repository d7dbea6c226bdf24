"""Load a LLaMA-family LLM (weights + tokenizer + chat template) from any supported format.

Formats, detected from the path alone:

* a ``.gguf`` file (llama.cpp), tokenizer and chat template embedded;
* a Hugging Face directory: ``config.json`` + ``*.safetensors`` (tokenizer from ``tokenizer.json``
  or ``tokenizer.model``);
* a Meta directory: ``params.json`` + ``consolidated.NN.pth``, with ``tokenizer.model`` in it or one
  level up (Meta's ``llama_dir/7B/`` + ``llama_dir/tokenizer.model``).

With no path, the embedded default model (SmolLM2-135M-Instruct, GGUF) is used.

``load_llm(path, quantize="q8" | "q4_1" | "q4_k")`` quantises the token embedding, the LM head and the
projections while reading them (`imagebind_llm.llm.weights.quantize`), into the blocks the CPU kernels multiply;
`export_gguf` (``imagebind-llm export-gguf``) writes the same blocks into a GGUF file for llama.cpp.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LLMConfig
from ..model import Transformer
from ..tokenizer import GGUF_TOKENIZER_TYPES, BaseTokenizer, HFTokenizer, load_tokenizer
from .common import CheckpointMismatchError, SourceTensor, WeightsFormatError, build_model
from .gguf import find_default_gguf, load_gguf, metadata_value
from .hf import hf_tensors, load_hf_state_dict
from .meta import SHARD_GLOB, load_meta_state_dict, meta_tensors
from .quantize import QUANT_TYPES, QuantizeReport, block_type, check_quantize, quantized_weight

__all__ = [
    "BASE_MARKER",
    "CheckpointMismatchError",
    "LoadedLLM",
    "QUANT_TYPES",
    "WeightsFormatError",
    "base_marker",
    "detect_format",
    "load_hf_state_dict",
    "load_llm",
    "load_meta_state_dict",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

FORMATS = ("gguf", "hf", "meta")
BASE_MARKER = "imagebind_llm_base.json"  # `merge_delta` writes it beside the base it merged
GGUF_BASE_KEY = "imagebind_llm.base"  # `export_gguf` copies the marker into the file's metadata under this key
_EXPECTED = (
    "a .gguf file; a Hugging Face directory with config.json and *.safetensors; "
    "or a Meta directory with params.json and consolidated.00.pth"
)


@dataclass
class LoadedLLM:
    """A ready-to-use LLM: the decoder (eval mode), its tokenizer, and where it came from.

    ``tokenizer.chat_template`` holds the model's own Jinja chat template when the files carry one.
    """

    model: Transformer
    tokenizer: BaseTokenizer
    format: str
    path: Path

    @property
    def config(self) -> LLMConfig:
        return self.model.config


def detect_format(path: str | Path) -> str:
    """``"gguf"``, ``"hf"`` or ``"meta"`` for `path`.

    Raises:
        FileNotFoundError: `path` does not exist.
        WeightsFormatError: no known format; the message lists what was found and what is expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; expected {_EXPECTED}")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        hint = f"; pass its folder {path.parent}" if path.suffix in (".safetensors", ".pth", ".json") else ""
        raise WeightsFormatError(f"{path} is a file but not a GGUF file; expected {_EXPECTED}{hint}")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if (path / "params.json").is_file() and any(path.glob(SHARD_GLOB)):
        return "meta"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    hint = ""
    subdirs = [p.name for p in path.iterdir() if p.is_dir() and (p / "params.json").is_file()]
    if subdirs:
        hint = f"; this looks like a Meta llama_dir: pass one of its model folders, e.g. {path / sorted(subdirs)[0]}"
    shown = ", ".join(found[:12]) + (f", ... ({len(found)} entries)" if len(found) > 12 else "")
    raise WeightsFormatError(f"{path} holds no supported weights (found: {shown or 'nothing'}); expected {_EXPECTED}{hint}")


def base_marker(path: str | Path) -> str | None:
    """What `merge_delta` recorded about the base LLM at ``path`` (its marker file beside the weights, or the
    metadata value in a GGUF file exported from such a folder), or None for a base it did not make."""
    path = Path(path)
    if path.is_dir():
        marker = path / BASE_MARKER
        return marker.read_text(encoding="utf-8") if marker.is_file() else None
    return metadata_value(path, GGUF_BASE_KEY) if path.is_file() and path.suffix.lower() == ".gguf" else None


def _meta_tokenizer(path: Path) -> BaseTokenizer:
    for folder in (path, path.parent):
        if (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
            return load_tokenizer(folder)
    raise FileNotFoundError(f"no tokenizer.model in {path} or {path.parent}; copy Meta's tokenizer.model next to "
                            "params.json")


def _tokenizer_next_to(path: Path, kind: str | None) -> BaseTokenizer:
    try:
        return load_tokenizer(path.parent)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} embeds a {kind!r} tokenizer, which we do not rebuild from GGUF (only {GGUF_TOKENIZER_TYPES}); "
            f"put the model's tokenizer.model or tokenizer.json next to it in {path.parent}"
        ) from None


def _check_vocabulary(tokenizer: BaseTokenizer, config: LLMConfig, path: Path) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointMismatchError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} "
            "embeddings; the tokenizer belongs to another model"
        )


def read_checkpoint(path: Path, fmt: str) -> tuple[BaseTokenizer, LLMConfig, list[SourceTensor]]:
    """The tokenizer, config and (not yet read) tensors of a Meta or Hugging Face directory of format `fmt`.

    The tokenizer comes first: a missing one fails before the weights are opened.

    Raises:
        FileNotFoundError, WeightsFormatError, CheckpointMismatchError: as `load_llm`.
    """
    tokenizer = load_tokenizer(path) if fmt == "hf" else _meta_tokenizer(path)
    config, tensors = (hf_tensors if fmt == "hf" else meta_tensors)(path)
    _check_vocabulary(tokenizer, config, path)
    return tokenizer, config, tensors


def load_llm(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", quantized: bool | None = None,
             quantize: str | None = None) -> LoadedLLM:
    """Load an LLM from `path` (any supported format) or the embedded default.

    Args:
        path: a ``.gguf`` file, a Hugging Face or a Meta directory; None for the embedded SmolLM2.
        dtype: parameter dtype (quantised GGUF tensors are dequantised to it unless kept quantised).
        device: where the parameters live.
        quantized: GGUF only: keep Q4_*, Q5_*, Q6_K and Q8_0 projections in their blocks (see `load_gguf`;
            None: when float32 on the CPU with the kernels available).
        quantize: ``"q8"``, ``"q4_1"`` or ``"q4_k"``: quantise the token embedding, the LM head and the
            projections tensor by tensor while reading them, bit-exactly as llama.cpp would (the other
            tensors stay float32). A GGUF file's tensors that are quantised already keep their own types;
            its float ones are quantised. Needs float32 on the CPU.

    Raises:
        FileNotFoundError: the path, a weight shard or the tokenizer is missing.
        WeightsFormatError: the path holds no supported format or an unsupported architecture.
        CheckpointMismatchError: the weights do not match the configuration stored with them.
        ValueError: other invalid files (e.g. a corrupt GGUF), or `quantize` with another dtype or device.
    """
    check_quantize(quantize, dtype, device)
    path = Path(path) if path is not None else find_default_gguf()
    fmt = detect_format(path)
    if fmt == "gguf":
        model, metadata = load_gguf(path, dtype=dtype, device=device, quantized=quantized, quantize=quantize)
        if metadata.get("tokenizer.ggml.model") in GGUF_TOKENIZER_TYPES:
            tokenizer: BaseTokenizer = HFTokenizer.from_gguf_metadata(metadata)
        else:  # a vocabulary type we do not rebuild: use the model's tokenizer file next to the GGUF
            tokenizer = _tokenizer_next_to(path, metadata.get("tokenizer.ggml.model"))
        _check_vocabulary(tokenizer, model.config, path)
    else:
        tokenizer, config, tensors = read_checkpoint(path, fmt)
        report = QuantizeReport(str(path))
        state = {}
        for tensor in tensors:  # one at a time: only the quantised blocks stay
            qtype = block_type(tensor.key, tensor.shape, quantize) if quantize is not None else None
            state[tensor.key] = (quantized_weight(tensor, qtype, report) if qtype is not None
                                 else tensor.load(dtype, device))
        report.log_summary()
        model = build_model(config, state, path)
    logger.info("loaded %s model from %s (%d layers, dim %d)", fmt, path, model.config.n_layers, model.config.dim)
    return LoadedLLM(model=model, tokenizer=tokenizer, format=fmt, path=path)
