"""Media files -> the model's ``{modality: (tensor, weight)}`` inputs, through `imagebind_llm.preprocess`."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from imagebind_llm import preprocess
from imagebind_llm.model.imagebind_llm import MediaInputs, canonical_modality

# Request modality -> loader of a list of sources (paths, bytes, file objects; text: strings).
LOADERS: dict[str, Callable[[list[Any]], torch.Tensor]] = {
    "image": preprocess.load_images,
    "video": preprocess.load_video,
    "audio": preprocess.load_audio,
    "text": preprocess.tokenize,
    "point": preprocess.load_points,
    "depth": preprocess.load_depth,
    "thermal": preprocess.load_thermal,
    "imu": preprocess.load_imu,
}


def parse_weights(spec: str | None) -> dict[str, float]:
    """``"image=0.4,audio=0.6"`` -> ``{"image": 0.4, "audio": 0.6}``; names are checked."""
    weights: dict[str, float] = {}
    for item in filter(None, (spec or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad weight {item!r}: write MODALITY=NUMBER, e.g. image=0.4,audio=0.6")
        canonical_modality(name.strip())
        try:
            weights[name.strip().lower()] = float(value)
        except ValueError:
            raise ValueError(f"bad weight {item!r}: {value!r} is not a number") from None
    return weights


def load_media(sources: Mapping[str, Any], weights: Mapping[str, float] | None = None,
               dtype: torch.dtype = torch.float32) -> MediaInputs:
    """Load one request's media: ``{"image": "a.jpg", "text": "a dog"}`` -> ``{"image": ([1, ...], w)}``.

    Weights default to 1 for every given modality (the official demo's default).
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - {k.lower() for k in sources})
    if unknown:
        raise ValueError(f"weights given for {unknown} but no such media; add e.g. --{unknown[0]} FILE")
    inputs = {}
    for name, source in sources.items():
        key = name.lower()
        if key not in LOADERS:
            canonical_modality(key)  # raises UnknownModalityError naming the choices
            raise ValueError(f"no loader for modality {name!r}; use one of {sorted(LOADERS)}")
        tensor = LOADERS[key]([source])
        inputs[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor, weights.get(key, 1.0))
    return inputs

