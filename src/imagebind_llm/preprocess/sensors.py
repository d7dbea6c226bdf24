"""Depth, thermal and IMU loaders. Upstream ImageBind ships no loaders for these; the conventions
below follow the published recipes and are documented so inputs can be prepared to match.

Depth -> ``[N, 1, 224, 224]`` *disparity* (ImageBind's depth encoder was trained on disparity, as in
Omnivore): by default the input is metric **depth** and is converted with
``disparity = baseline * focal / depth_m`` (depth clipped to ``[min_depth, max_depth]`` metres first).
Integer maps (16-bit PNG, integer ``.npy``) are taken as millimetres, float maps as metres, unless
``depth_scale`` says otherwise; missing depth (0) is clipped to ``min_depth`` like any near value.
Pass ``kind="disparity"`` for maps that already hold disparity (used as-is, as float). The map is then
resized (short side 224, bilinear with antialias) and centre-cropped; no mean/std normalisation unless
configured.

Thermal -> ``[N, 1, 224, 224]`` in [0, 1]: grayscale, short side 224 with PIL bicubic, centre crop 224,
/255, **no** mean/std normalisation (the LLVIP recipe; users report better accuracy without it).
16-bit / float thermal images are min-max scaled to [0, 1] per image.

IMU -> ``[N, 6, 2000]``: channels in the order accelerometer x, y, z, gyroscope x, y, z (Ego4D's
layout). ``.npy`` arrays may be ``[T, 6]`` or ``[6, T]`` (``[6, 6]`` is read as ``[T, 6]``); ``.csv``
files hold one row per time step with 6 numeric columns (or 7, the first being a timestamp, dropped), an
optional header line. The series is linearly resampled (end points kept) to 2000 steps; values are not
normalised.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import (NPY_MAGIC, MediaError, as_list, decode_text, is_source, load_npy, read_source, source_name,
                     source_suffix, unsupported_type)
from .image import HIGH_DEPTH_MODES, center_crop, decode_image, open_image, resize_short_side, stretch_to_l8, to_l8


@dataclass
class DepthConfig:
    """Depth preprocessing parameters.

    ``kind``: ``"depth"`` (converted to disparity) or ``"disparity"`` (used as-is).
    ``depth_scale``: input units per metre; ``None`` = 1000 for integer maps (mm), 1 for float maps (m).
    ``focal_length`` (pixels) and ``baseline`` (metres) default to the NYU-v2 / SUN RGB-D Kinect values.
    """

    kind: str = "depth"
    depth_scale: float | None = None
    focal_length: float = 518.8579
    baseline: float = 0.075
    min_depth: float = 0.01
    max_depth: float = 50.0
    size: int = 224
    mean: float | None = None
    std: float | None = None


@dataclass
class ThermalConfig:
    """Thermal preprocessing parameters (``mean``/``std`` ``None`` = no normalisation)."""

    size: int = 224
    mean: float | None = None
    std: float | None = None


@dataclass
class IMUConfig:
    """IMU preprocessing parameters."""

    num_steps: int = 2000
    channels: int = 6


def _read_array(source: Any, index: int, image_ok: bool) -> tuple[str, np.ndarray]:
    """Path/bytes/file (``.npy``, ``.csv`` or an image when ``image_ok``), array or tensor -> (name, array)."""
    if isinstance(source, torch.Tensor):
        return f"<tensor #{index}>", source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return f"<array #{index}>", source
    if isinstance(source, Image.Image):
        return f"<image #{index}>", np.asarray(source)
    name = source_name(source, index)
    if not is_source(source):
        raise unsupported_type(source, index, "a path, bytes, a binary file object, an array or a tensor")
    data = read_source(source, index)
    suffix = source_suffix(source)
    if suffix == ".npy" or (not suffix and data.startswith(NPY_MAGIC)):
        return name, load_npy(data, name)
    if suffix in (".csv", ".txt") or not image_ok:
        text = decode_text(data, name, "a CSV/NPY file")
        try:
            return name, _parse_csv(text)
        except ValueError as e:
            raise MediaError(name, f"cannot read the table ({e}); expected rows of numbers, comma separated") from None
    return name, np.asarray(decode_image(io.BytesIO(data), name))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_csv(text: str) -> np.ndarray:
    """Numeric rows of a comma/semicolon/whitespace separated table; a non-numeric first line is a header."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    rows = [ln.replace(";", ",").replace(",", " ").split() for ln in lines]
    if rows and not all(_is_number(v) for v in rows[0]):
        rows = rows[1:]
    return np.asarray([[float(v) for v in row] for row in rows], dtype=np.float64)


def _resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[1, H, W]`` float -> short side ``size`` (bilinear, antialias) -> centre crop ``[1, size, size]``."""
    h, w = x.shape[-2:]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = torch.nn.functional.interpolate(
        x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def depth_to_disparity(depth: np.ndarray, config: DepthConfig = DepthConfig()) -> np.ndarray:
    """Metric depth map -> disparity ``baseline * focal / clip(depth_m)`` (float32)."""
    scale = config.depth_scale or (1000.0 if np.issubdtype(depth.dtype, np.integer) else 1.0)
    metres = np.clip(depth.astype(np.float64) / scale, config.min_depth, config.max_depth)
    return (config.baseline * config.focal_length / metres).astype(np.float32)


def load_depth(sources: Any, config: DepthConfig = DepthConfig()) -> torch.Tensor:
    """Load depth (or disparity) maps for ImageBind's depth encoder.

    Args:
        sources: one or a list of 16-bit PNG / image files, ``.npy`` files, arrays or tensors ``[H, W]``
            (or ``[1, H, W]`` / ``[H, W, 1]``), as paths, bytes or file objects.
        config: conventions (see the module docstring).

    Returns:
        ``[N, 1, 224, 224]`` float32 disparity.
    """
    if config.kind not in ("depth", "disparity"):
        raise ValueError(f"DepthConfig.kind must be 'depth' or 'disparity', got {config.kind!r}")
    out = []
    for i, source in enumerate([sources] if isinstance(sources, (np.ndarray, torch.Tensor)) else as_list(sources)):
        name, array = _read_array(source, i, image_ok=True)
        array = np.squeeze(array)
        if array.ndim != 2 or min(array.shape) == 0:
            raise MediaError(name, f"expected a single-channel depth map [H, W], got shape {list(np.shape(array))}")
        if not np.isfinite(array.astype(np.float64)).all():
            raise MediaError(name, "depth map has NaN or infinite values; fill or mask them first")
        disparity = depth_to_disparity(array, config) if config.kind == "depth" else array.astype(np.float32)
        x = _resize_crop(torch.from_numpy(disparity)[None], config.size)
        if config.mean is not None and config.std is not None:
            x = (x - config.mean) / config.std
        out.append(x)
    return torch.stack(out)


def _thermal_image(source: Any, index: int) -> Image.Image:
    """Any accepted thermal input -> an 8-bit grayscale PIL image (16-bit / float input min-max scaled)."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray) and source.dtype != np.uint8:
        return stretch_to_l8(np.squeeze(source).astype(np.float64), f"<array #{index}>")
    image = open_image(source, index, mode=None)
    if image.mode in HIGH_DEPTH_MODES:
        return to_l8(image, source_name(source, index), stretch=True)
    return image.convert("L")


def load_thermal(sources: Any, config: ThermalConfig = ThermalConfig()) -> torch.Tensor:
    """Load thermal images for ImageBind's thermal encoder.

    Args:
        sources: one or a list of image paths, bytes, file objects, PIL images or arrays ``[H, W]``.
        config: preprocessing parameters.

    Returns:
        ``[N, 1, 224, 224]`` float32 in [0, 1] (unless ``mean``/``std`` are set).
    """
    out = []
    for i, source in enumerate([sources] if isinstance(sources, (np.ndarray, torch.Tensor)) else as_list(sources)):
        image = center_crop(resize_short_side(_thermal_image(source, i), config.size), config.size)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div(255.0)[None]
        if config.mean is not None and config.std is not None:
            x = (x - config.mean) / config.std
        out.append(x)
    return torch.stack(out)


def _imu_series(array: np.ndarray, name: str, channels: int) -> torch.Tensor:
    """``[T, C]`` / ``[C, T]`` (or ``[T, C + 1]`` with a leading timestamp column) -> ``[C, T]`` float32."""
    if array.ndim == 2 and array.shape[1] == channels + 1 and array.shape[0] != channels:
        array = array[:, 1:]  # leading timestamp column
    if array.ndim == 2 and array.shape[1] == channels:
        series = array.T
    elif array.ndim == 2 and array.shape[0] == channels:
        series = array
    else:
        expected = f"[T, {channels}] or [{channels}, T] (acc xyz, gyro xyz)"
        raise MediaError(name, f"expected IMU data {expected}, got {list(array.shape)}")
    if series.shape[1] < 2:
        raise MediaError(name, f"IMU series has {series.shape[1]} time step(s); need at least 2")
    if not np.isfinite(series.astype(np.float64)).all():
        raise MediaError(name, "IMU data has NaN or infinite values; fill or drop those rows first")
    return torch.from_numpy(np.ascontiguousarray(series, dtype=np.float32))


def load_imu(sources: Any, config: IMUConfig = IMUConfig()) -> torch.Tensor:
    """Load IMU recordings for ImageBind's IMU encoder.

    Args:
        sources: one or a list of ``.npy`` / ``.csv`` paths, bytes, file objects, arrays or tensors.
        config: preprocessing parameters.

    Returns:
        ``[N, 6, 2000]`` float32 (acc xyz, gyro xyz), linearly resampled in time.
    """
    out = []
    for i, source in enumerate([sources] if isinstance(sources, (np.ndarray, torch.Tensor)) else as_list(sources)):
        name, array = _read_array(source, i, image_ok=False)
        series = _imu_series(np.asarray(array), name, config.channels)
        resampled = torch.nn.functional.interpolate(series[None], config.num_steps, mode="linear", align_corners=True)
        out.append(resampled[0])
    return torch.stack(out)
