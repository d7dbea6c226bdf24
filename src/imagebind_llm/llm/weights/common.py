"""Pieces shared by the weight converters: key mapping tables, lazily read tensors, shape checks, model assembly,
errors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LLMConfig
from ..model import Transformer
from ..quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_FIX = "the weights and the config file do not belong together: use the config shipped with these weights"


class WeightsFormatError(ValueError):
    """A path that holds no weight format we can load."""


class CheckpointMismatchError(ValueError):
    """Tensors that do not match the model configuration (missing, unexpected or wrongly shaped)."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint in our naming and layout, read when asked (from memory-mapped files).

    Attributes:
        key: our state-dict key.
        shape: its shape in our layout.
        read: ``read(start, stop)``: rows ``[start, stop)`` (of a 1-D tensor: elements) in the file's dtype, on the
            CPU; for the whole tensor it may be a view of the mapped file.
        row_multiple: row slices must start and stop at multiples of it (the rows of a Hugging Face q/k
            projection are permuted within each head).
    """

    key: str
    shape: tuple[int, ...]
    read: Callable[[int, int], torch.Tensor]
    row_multiple: int = 1

    def load(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole tensor, floating-point ones cast to `dtype` (None: the file's)."""
        value = self.read(0, self.shape[0])
        return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object of a config file (``config.json``, ``params.json``, an index).

    Raises:
        WeightsFormatError: naming the file, when it is not UTF-8, not JSON, or not a JSON object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFormatError(f"{path} is not valid JSON ({e}); restore the file shipped with the weights") from None
    if not isinstance(value, dict):
        raise WeightsFormatError(f"{path} holds a JSON {type(value).__name__}, not an object; restore the file "
                                 "shipped with the weights")
    return value


def map_key(name: str, table: Mapping[str, str]) -> str | None:
    """Translate `name` with a table whose keys and values use ``{}`` for the layer index; None if unknown."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return table.get(name)
    pattern = name[: match.start()] + ".{}." + name[match.end():]
    target = table.get(pattern)
    return target.format(match.group(1)) if target is not None else None


def invert(table: Mapping[str, str]) -> dict[str, str]:
    """The inverse of a one-to-one key mapping table."""
    inverse = {v: k for k, v in table.items()}
    assert len(inverse) == len(table), "mapping table is not one-to-one"
    return inverse


def expected_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict key -> shape for `config` (computed on the meta device: no memory used)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shape(key: str, shape: tuple[int, ...], expected: Mapping[str, tuple[int, ...]], source: str | Path) -> None:
    """Raise `CheckpointMismatchError` unless `key` is expected with exactly `shape`.

    Args:
        key: our state-dict key.
        shape: the tensor's shape in the file, after conversion to our layout.
        expected: from `expected_shapes`.
        source: the file or tensor name, for the message.
    """
    if key not in expected:
        raise CheckpointMismatchError(
            f"{source}: tensor {key!r} is not part of a model with this configuration "
            f"({_describe(expected)}); {_FIX}"
        )
    if tuple(shape) != expected[key]:
        raise CheckpointMismatchError(
            f"{source}: tensor {key!r} has shape {list(shape)} but the config expects {list(expected[key])}; {_FIX}"
        )


def check_complete(present: Iterable[str], expected: Mapping[str, tuple[int, ...]], source: str | Path) -> None:
    """Raise `CheckpointMismatchError` naming the tensors the model needs and `present` (keys or a dict) lacks."""
    missing = sorted(set(expected) - set(present))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointMismatchError(f"{source}: missing tensors {missing[:5]}{more} ({_describe(expected)})")


def build_model(config: LLMConfig, state: Mapping[str, torch.Tensor | QuantizedWeight],
                source: str | Path) -> Transformer:
    """A `Transformer` whose parameters are the tensors of `state` (assigned, not copied), in eval mode.

    The model is built on the meta device, so no random initialisation happens and no second copy of
    the weights is made; dtype and device are those of the tensors in `state`. A `QuantizedWeight` value
    makes its module a `QuantizedLinear` (or `QuantizedEmbedding`; with tied embeddings the LM head shares it).

    Raises:
        CheckpointMismatchError: `state` has missing, unexpected or wrongly shaped tensors.
    """
    expected = expected_shapes(config)
    for key, value in state.items():
        shape = (value.out_features, value.in_features) if isinstance(value, QuantizedWeight) else value.shape
        check_shape(key, tuple(shape), expected, source)
    check_complete(state, expected, source)
    with torch.device("meta"):
        model = Transformer(config)
    packed = {key: value for key, value in state.items() if isinstance(value, QuantizedWeight)}
    for key, weight in packed.items():
        name = key.removesuffix(".weight")
        if name == "tok_embeddings":
            model.tok_embeddings = QuantizedEmbedding(weight)
            if config.tie_embeddings:
                model.output = QuantizedLinear(weight)
        else:
            linear = model.get_submodule(name)
            model.set_submodule(name, QuantizedLinear(weight, bias=None if linear.bias is None else linear.bias))
    dense = {key: value for key, value in state.items() if key not in packed}
    missing, unexpected = model.load_state_dict(dense, assign=True, strict=not packed)
    quantized = {name for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert not unexpected and all(k.split(".quantized.")[0] in quantized for k in missing), (missing, unexpected)
    return model.eval()


def _describe(expected: Mapping[str, tuple[int, ...]]) -> str:
    n_layers = len({k.split(".")[1] for k in expected if k.startswith("layers.")})
    vocab, dim = expected["tok_embeddings.weight"]
    return f"config: {n_layers} layers, dim {dim}, vocab {vocab}"
