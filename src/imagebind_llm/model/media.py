"""Media in a request: the one modality table, loading files into tensors, and the official weighted mix.

A request's media are ``{modality: (tensor [1, ...], weight)}`` (`MediaInputs`); `MODALITIES` says, for
every name a request (or the CLI, the server) may use, which ImageBind tower encodes it and which
`imagebind_llm.preprocess` loader reads it.
"""

from __future__ import annotations

import math
import numbers
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
        item_ndim: dimensions of one item, without the batch (image ``[3, H, W]``: 3).
        is_file: False for ``text``, whose source is the string itself.
    """

    name: str
    tower: str
    load: Callable[[list[Any]], torch.Tensor]
    item_ndim: int
    is_file: bool = True


MODALITIES: dict[str, Modality] = {m.name: m for m in (
    Modality("image", "vision", preprocess.load_images, 3),
    Modality("video", "vision", preprocess.load_video, 5),
    Modality("audio", "audio", preprocess.load_audio, 4),
    Modality("text", "text", preprocess.tokenize, 1, is_file=False),
    Modality("point", "point", preprocess.load_points, 2),
    Modality("depth", "depth", preprocess.load_depth, 3),
    Modality("thermal", "thermal", preprocess.load_thermal, 3),
    Modality("imu", "imu", preprocess.load_imu, 2),
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
    """``"image=0.4,audio=0.6"`` -> ``{"image": 0.4, "audio": 0.6}``; names and values are checked.

    Raises:
        ValueError: an item that is not ``MODALITY=NUMBER``, an unknown modality, a modality given twice
            (aliases count: ``vision`` is ``image``), or a weight `check_weight` refuses.
    """
    weights: dict[str, float] = {}
    for item in filter(None, (spec or "").split(",")):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not (sep and name and value):
            raise ValueError(f"bad weight {item!r}: --weight needs MODALITY=NUMBER, e.g. image=0.4 "
                             "(several: image=0.4,audio=0.6)")
        try:
            entry = modality(name)
        except UnknownModalityError:
            raise UnknownModalityError(f"bad weight {item!r}: unknown modality {name!r}; use one of "
                                       f"{sorted(MODALITIES)}") from None
        label = entry.name if name.lower() == entry.name else f"{entry.name} (given as {name!r})"
        if entry.name in weights:
            raise ValueError(f"bad weight {item!r}: {label} is weighted twice; give each modality one weight")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad weight {item!r}: {value!r} is not a number; --weight needs MODALITY=NUMBER, "
                             "e.g. image=0.4") from None
        weights[entry.name] = check_weight(label, number)
    return weights


def check_weight(name: str, weight: Any) -> float:
    """A modality weight must be a finite real number >= 0 (NaN, infinities and booleans fail)."""
    if not (isinstance(weight, numbers.Real) and not isinstance(weight, bool)
            and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"the weight of {name} must be a finite number >= 0, got {weight!r}")
    return float(weight)


def check_weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """`check_weight` for each of a request's weights, which must not all be 0 (the mix would be all zeros)."""
    values = {name: check_weight(name, w) for name, w in weights.items()}
    if values and not any(values.values()):
        raise ValueError(f"all media weights are 0 ({', '.join(f'{n}=0' for n in values)}); give at least one "
                         "weight > 0 or drop the media")
    return values


def load_media(sources: Mapping[str, Any], weights: Mapping[str, float] | None = None,
               dtype: torch.dtype = torch.float32) -> MediaInputs:
    """Load one request's media: ``{"image": "a.jpg", "text": "a dog"}`` -> ``{"image": ([1, ...], w)}``.

    Weights default to 1 for every given modality (the official demo's default); they are checked
    (`check_weights`) before any file is read.
    """
    weights = {modality(k).name: w for k, w in (weights or {}).items()}
    names = {modality(k).name: source for k, source in sources.items()}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"weights given for {unknown} but no such media; add e.g. --{unknown[0]} FILE")
    weights = check_weights({name: weights.get(name, 1.0) for name in names})
    inputs = {}
    for name, source in names.items():
        tensor = MODALITIES[name].load([source])
        inputs[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor, weights[name])
    return inputs


def weighted_sum(embeddings: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Official fusion ``sum_i w_i / (sum_j w_j + 1e-6) * e_i``, weights as Python floats -> ``[B, D]``."""
    values = check_weights(weights)
    total = sum(values.values()) + MIX_EPS
    mixed = None
    for name, embedding in embeddings.items():
        term = (values[name] / total) * embedding
        mixed = term if mixed is None else mixed + term
    return mixed


def as_row(x: torch.Tensor) -> torch.Tensor:
    """One request's media tensor, ``[1, ...]`` or ``[...]``, as ``[1, ...]``."""
    return x if x.ndim and x.shape[0] == 1 else x.unsqueeze(0)


def per_prompt(media: MediaInputs, prompts: int) -> MediaInputs | list[MediaInputs]:
    """One media dict for ``prompts`` prompts: as is when every tensor holds one item (``[1, ...]`` or an
    unbatched item; the same media for every prompt), else split into one dict per prompt, each tensor
    holding one item or ``prompts`` items (row ``i`` for prompt ``i``, as the official batched ``generate``).

    Raises:
        ValueError: a tensor whose batch size is neither 1 nor ``prompts``, or whose shape fits no batch.
    """
    sizes = {}
    for name, (x, _) in media.items():
        ndim = modality(name).item_ndim
        if x.ndim not in (ndim, ndim + 1):
            raise ValueError(f"the {name} tensor has shape {list(x.shape)}; expected {ndim + 1} dimensions "
                             f"[batch, ...] as load_media returns (or {ndim} for one item)")
        sizes[name] = x.shape[0] if x.ndim == ndim + 1 else 1
    if all(size == 1 for size in sizes.values()):
        return media
    if any(size not in (1, prompts) for size in sizes.values()):
        given = ", ".join(f"{name} {size}" for name, size in sizes.items())
        per = f" (shared by every prompt) or {prompts} (one per prompt)" if prompts > 1 else ""
        raise ValueError(f"{prompts} prompt{'s' if prompts > 1 else ''} but media batch sizes {given}; each tensor "
                         f"must hold 1 item{per}, or pass a list of one media dict per prompt")
    return [{name: (x[i : i + 1] if sizes[name] == prompts else x, w) for name, (x, w) in media.items()}
            for i in range(prompts)]


def group_rows(rows: Sequence[MediaInputs | None]) -> dict[tuple[str, tuple[int, ...]], list[int]]:
    """Which rows share a modality and an item shape (one encoder batch each): ``{(name, shape): rows}``."""
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, row in enumerate(rows):
        for name, (x, _) in (row or {}).items():
            groups.setdefault((modality(name).name, tuple(as_row(x).shape[1:])), []).append(i)
    return groups
