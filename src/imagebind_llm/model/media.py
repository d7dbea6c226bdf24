"""Media in a request: the one modality table, loading files into tensors, and the official weighted mix.

A request's media are ``{modality: (tensor [1, ...], weight)}`` (`MediaInputs`); `MODALITIES` says, for
every name a request (or the CLI, the server) may use, which ImageBind tower encodes it and which
`imagebind_llm.preprocess` loader reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from imagebind_llm import preprocess

MediaInputs = Mapping[str, tuple[torch.Tensor, float]]
MIX_EPS = 1e-6  # the official mix divides by (sum of weights + 1e-6), also for a single input


class UnknownModalityError(ValueError):
    """A request named a modality ImageBind-LLM does not have."""


@dataclass(frozen=True)
class Modality:
    """One kind of media: its request name, the ImageBind tower that encodes it, and its loader.

    Attributes:
        name: the request name (``--image``, ``{"type": "image"}``).
        tower: the ImageBind modality key (images and videos share ``"vision"``).
        load: a list of sources (paths, bytes, file objects; text: strings) -> a batch tensor.
        is_file: False for ``text``, whose source is the string itself.
    """

    name: str
    tower: str
    load: Callable[[list[Any]], torch.Tensor]
    is_file: bool = True


MODALITIES: dict[str, Modality] = {m.name: m for m in (
    Modality("image", "vision", preprocess.load_images),
    Modality("video", "vision", preprocess.load_video),
    Modality("audio", "audio", preprocess.load_audio),
    Modality("text", "text", preprocess.tokenize, is_file=False),
    Modality("point", "point", preprocess.load_points),
    Modality("depth", "depth", preprocess.load_depth),
    Modality("thermal", "thermal", preprocess.load_thermal),
    Modality("imu", "imu", preprocess.load_imu),
)}
_ALIASES = {"vision": "image"}


def modality(name: str) -> Modality:
    """The table entry of ``name`` (case-insensitive); unknown names raise naming the choices."""
    key = name.lower()
    entry = MODALITIES.get(_ALIASES.get(key, key))
    if entry is None:
        raise UnknownModalityError(f"unknown modality {name!r}; use one of {sorted(MODALITIES)}")
    return entry


def canonical_modality(name: str) -> str:
    """``'Image'`` -> ``'vision'``, ``'Audio'`` -> ``'audio'``: the ImageBind tower of a request name."""
    return modality(name).tower


def parse_weights(spec: str | None) -> dict[str, float]:
    """``"image=0.4,audio=0.6"`` -> ``{"image": 0.4, "audio": 0.6}``; names and values are checked."""
    weights: dict[str, float] = {}
    for item in filter(None, (spec or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad weight {item!r}: write MODALITY=NUMBER, e.g. image=0.4,audio=0.6")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad weight {item!r}: {value!r} is not a number") from None
        weights[modality(name.strip()).name] = check_weight(name.strip(), number)
    return weights


def check_weight(name: str, weight: float) -> float:
    """A modality weight must be a finite number >= 0 (NaN fails too)."""
    if not (isinstance(weight, (int, float)) and weight >= 0 and weight != float("inf")):
        raise ValueError(f"the weight of {name} must be a finite number >= 0, got {weight!r}")
    return float(weight)


def load_media(sources: Mapping[str, Any], weights: Mapping[str, float] | None = None,
               dtype: torch.dtype = torch.float32) -> MediaInputs:
    """Load one request's media: ``{"image": "a.jpg", "text": "a dog"}`` -> ``{"image": ([1, ...], w)}``.

    Weights default to 1 for every given modality (the official demo's default).
    """
    weights = {modality(k).name: check_weight(k, w) for k, w in (weights or {}).items()}
    names = {modality(k).name: source for k, source in sources.items()}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"weights given for {unknown} but no such media; add e.g. --{unknown[0]} FILE")
    inputs = {}
    for name, source in names.items():
        tensor = MODALITIES[name].load([source])
        inputs[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor, weights.get(name, 1.0))
    return inputs


def weighted_sum(embeddings: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Official fusion ``sum_i w_i / (sum_j w_j + 1e-6) * e_i``, weights as Python floats -> ``[B, D]``."""
    values = {name: check_weight(name, w) for name, w in weights.items()}
    total = sum(values.values()) + MIX_EPS
    mixed = None
    for name, embedding in embeddings.items():
        term = (values[name] / total) * embedding
        mixed = term if mixed is None else mixed + term
    return mixed


def as_row(x: torch.Tensor) -> torch.Tensor:
    """One request's media tensor, ``[1, ...]`` or ``[...]``, as ``[1, ...]``."""
    return x if x.ndim and x.shape[0] == 1 else x.unsqueeze(0)


def group_rows(rows: Sequence[MediaInputs | None]) -> dict[tuple[str, tuple[int, ...]], list[int]]:
    """Which rows share a modality and an item shape (one encoder batch each): ``{(name, shape): rows}``."""
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, row in enumerate(rows):
        for name, (x, _) in (row or {}).items():
            groups.setdefault((modality(name).name, tuple(as_row(x).shape[1:])), []).append(i)
    return groups
