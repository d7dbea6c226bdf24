"""RGB image preprocessing as ImageBind's ``load_and_transform_vision_data``, and the training crop.

Inference: PIL RGB -> resize the short side to 224 with PIL's (antialiased) bicubic -> centre crop
224 (offset ``round((size - 224) / 2)``) -> /255 -> CLIP mean/std. Training (ImageBind-LLM's
``dataset.py``): ``RandomResizedCrop(224, scale=(0.9, 1), ratio=(3/4, 4/3), bicubic)``, no flip.

To RGB (`to_rgb`): 8-bit modes (L, LA, P with or without transparency, RGBA, CMYK, 1, ...) with PIL's
``convert("RGB")`` as upstream (alpha is dropped, not composited). Pillow's own conversion clips
high-bit-depth grayscale to 0..255, so those are first scaled to 8 bits (`to_l8`): 16-bit modes by their
full range (``v / 257``), float images holding values in [0, 1] by ``v * 255``, and 32-bit integer or
other float images min-max per image (they have no fixed range).

EXIF orientation is **not** applied, as upstream (``Image.open(f).convert("RGB")`` without
``ImageOps.exif_transpose``): a photo stored sideways with an orientation tag is encoded sideways, as the
released models saw their inputs. Rotate such photos before loading if that matters.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import MediaError, as_list, is_source, open_source, sniff_kind, source_name, unsupported_type

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
HIGH_DEPTH_MODES = (*SIXTEEN_BIT_MODES, "I", "F")  # what PIL's convert() clips to 0..255


@dataclass
class ImageConfig:
    """Image preprocessing parameters (defaults = ImageBind)."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    train_scale: tuple[float, float] = (0.9, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)


def open_image(source: Any, index: int = 0, mode: str | None = "RGB") -> Image.Image:
    """Decode ``source`` (path, bytes, file object, PIL image or ``[H, W(, C)]`` array) to a PIL image.

    ``mode``: ``"RGB"`` converts with `to_rgb`; ``None`` keeps the decoded mode.

    Raises:
        MediaError: missing, empty, truncated, undecodable or oversized input.
    """
    if isinstance(source, Image.Image):
        name, image = f"<image #{index}>", source
    elif isinstance(source, np.ndarray):
        name = f"<array #{index}>"
        try:
            image = Image.fromarray(source)
        except (TypeError, ValueError) as e:
            problem = f"cannot interpret an array of shape {source.shape} and dtype {source.dtype} as an image: {e}"
            raise MediaError(name, problem) from None
    elif is_source(source):
        name = source_name(source, index)
        with open_source(source, index) as f:
            image = decode_image(f, name)
    else:
        raise unsupported_type(source, index, "a path, bytes, a binary file object, a PIL image or a uint8 array")
    return image if mode is None else to_rgb(image, name) if mode == "RGB" else image.convert(mode)


def decode_image(f: BinaryIO, name: str) -> Image.Image:
    """Decode an open image file completely, in its own mode (truncation surfaces here, not later).

    Raises:
        MediaError: not an image, corrupt or truncated, or over Pillow's decompression-bomb limit
            (``PIL.Image.MAX_IMAGE_PIXELS``; over it is refused too, not just warned about).
    """
    start = f.tell()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(f)
            image.load()
        return image
    except UnidentifiedImageError:
        f.seek(start)
        kind = sniff_kind(f.read(16))
        looks = f" (this looks like {kind})" if kind else ""
        raise MediaError(name, f"not a recognised image format{looks}; expected JPEG, PNG, WebP, BMP, ...") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        sizes = re.findall(r"\d+", str(e))
        pixels, limit = (f"{int(sizes[0]):,}", f"{int(sizes[1]):,}") if len(sizes) == 2 else ("too many", "Pillow's")
        raise MediaError(name, f"image has {pixels} pixels, over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS, "
                               "against decompression bombs); downscale it first") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(name, f"image is corrupt or truncated ({e})") from None


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any mode Pillow decodes -> RGB (high-bit-depth grayscale scaled to 8 bits first, see the module docstring)."""
    return (to_l8(image, name) if image.mode in HIGH_DEPTH_MODES else image).convert("RGB")


def to_l8(image: Image.Image, name: str, stretch: bool = False) -> Image.Image:
    """A high-bit-depth grayscale image (`HIGH_DEPTH_MODES`) -> 8-bit ``L``.

    16-bit modes are scaled by their full range and float images within [0, 1] by 255; 32-bit integer
    images, other float images, and every image when ``stretch``, min-max (`stretch_to_l8`).
    """
    array = np.asarray(image, dtype=np.float64)
    if not stretch and image.mode in SIXTEEN_BIT_MODES:
        return _l8(array / 257.0)
    if not stretch and image.mode == "F" and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1:
        return _l8(array * 255.0)
    return stretch_to_l8(array, name)


def stretch_to_l8(array: np.ndarray, name: str) -> Image.Image:
    """Min-max scale a finite ``[H, W]`` array to an 8-bit ``L`` image (a constant one becomes black)."""
    if array.ndim != 2:
        raise MediaError(name, f"expected a single-channel image [H, W], got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise MediaError(name, "image has NaN or infinite values; fill or mask them first")
    low, high = array.min(), array.max()
    return _l8((array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array))


def _l8(values: np.ndarray) -> Image.Image:
    """Values in [0, 255] -> an ``L`` image (rounded to nearest)."""
    return Image.fromarray(np.round(values).astype(np.uint8))


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is ``size``; the longer one becomes ``int(size * long / short)``."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size x size`` window (offsets rounded half to even, as torchvision)."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_normalized_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL image -> float ``[C, H, W]`` in [0, 1], then ``(x - mean) / std`` per channel."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    x = x.unsqueeze(-1) if x.ndim == 2 else x
    x = x.permute(2, 0, 1).float().div(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


def transform_image(image: Image.Image, config: ImageConfig = ImageConfig()) -> torch.Tensor:
    """Inference transform of one RGB PIL image -> ``[3, size, size]``."""
    image = center_crop(resize_short_side(image, config.size), config.size)
    return to_normalized_tensor(image, config.mean, config.std)


def load_images(sources: Any, config: ImageConfig = ImageConfig()) -> torch.Tensor:
    """Load and preprocess images exactly as ImageBind's vision loader.

    Args:
        sources: one or a list of paths, bytes, binary file objects, PIL images or uint8 arrays.
        config: preprocessing parameters.

    Returns:
        ``[N, 3, 224, 224]`` float32.
    """
    return torch.stack([transform_image(open_image(s, i), config) for i, s in enumerate(as_list(sources))])


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """Sample a crop ``(left, top, w, h)`` with the RandomResizedCrop rule (10 tries, then a centre fallback)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(
    image: Any, generator: torch.Generator | None = None, config: ImageConfig = ImageConfig()
) -> torch.Tensor:
    """ImageBind-LLM's training augmentation: random resized crop (bicubic), no flip, CLIP normalisation.

    Args:
        image: anything `open_image` accepts.
        generator: torch RNG for reproducible crops (``None`` uses the global RNG).

    Returns:
        ``[3, size, size]`` float32.
    """
    image = open_image(image)
    left, top, w, h = random_resized_crop_box(*image.size, config.train_scale, config.train_ratio, generator)
    crop = image.crop((left, top, left + w, top + h)).resize((config.size, config.size), Image.BICUBIC)
    return to_normalized_tensor(crop, config.mean, config.std)
