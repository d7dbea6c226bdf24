"""Video preprocessing as ImageBind's ``load_and_transform_video_data`` (decoded with PyAV).

Per file: ``clips_per_video`` clips of ``clip_duration`` s placed by the same rule as audio
(`clip_times`; the video duration is ``frames / fps``) -> a clip spans frame ordinals
``ceil(fps * start) .. ceil(fps * end) - 1`` -> keep ``frames_per_clip`` of them uniformly
(``linspace(0, T - 1, k)``, i.e. first and last) -> /255 -> bilinear resize (no antialias) of the short
side to 224 (long side ``floor(long / short * 224)``) -> CLIP mean/std -> three 224 crops along the long
side (left/centre/right, or top/centre/bottom for portrait; offsets ``ceil``). Output order is
clip-major: ``[clips * crops, 3, frames_per_clip, 224, 224]``.

Only the frames that are kept get converted to RGB. Short videos are decoded sequentially up to the
last needed frame; long ones (more than ``seek_min_frames`` frames) seek to the key frame before each
needed frame and map presentation timestamps to frame ordinals with the average frame rate (exact for
constant frame rate; approximate for variable frame rate). Rotation metadata is not applied (as
upstream). A still image (one frame of JPEG, PNG, ...; FFmpeg would read it as a video) is refused;
animated GIF / APNG are videos.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch

from .audio import clip_times
from .errors import MediaError, as_list, open_source, sniff_kind, source_name
from .image import CLIP_MEAN, CLIP_STD


@dataclass
class VideoConfig:
    """Video preprocessing parameters (defaults = ImageBind)."""

    clip_duration: int = 2
    clips_per_video: int = 5
    frames_per_clip: int = 2
    size: int = 224
    num_crops: int = 3
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    seek_min_frames: int = 1500  # decoding strategy only; results are the same for CFR video


def frame_indices(num_frames: int, fps: float, config: VideoConfig) -> list[list[int]]:
    """The frame ordinals kept for each clip: ``clips_per_video`` lists of ``frames_per_clip`` indices."""
    out = []
    for start, end in clip_times(num_frames / fps, config.clip_duration, config.clips_per_video):
        first = min(math.ceil(fps * start), num_frames - 1)
        stop = max(min(math.ceil(fps * end), num_frames), first + 1)  # below 0.5 fps a clip may hold no frame
        picks = torch.linspace(0, stop - first - 1, config.frames_per_clip).long() + first
        out.append(picks.tolist())
    return out


def _stream_info(container: av.container.InputContainer, name: str) -> tuple[av.video.stream.VideoStream, int, float]:
    """The first video stream, its frame count and average fps (counting packets when the header lacks them)."""
    if not container.streams.video:
        raise MediaError(name, "has no video stream (audio-only file?); use load_audio for audio tracks")
    stream = container.streams.video[0]
    num_frames = stream.frames
    if num_frames <= 0:
        num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        container.seek(0)
    rate = stream.average_rate or stream.guessed_rate
    if num_frames <= 0:
        raise MediaError(name, "video stream has no frames")
    if not rate:
        raise MediaError(name, "video stream has no frame rate")
    return stream, num_frames, float(rate)


def _sequential_frames(container: Any, stream: Any, wanted: list[int]) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decode from the start, yielding ``(ordinal, frame)`` for the wanted ordinals (sorted, unique)."""
    targets, k = set(wanted), 0
    for i, frame in enumerate(container.decode(stream)):
        if i in targets:
            yield i, frame
            k += 1
            if k == len(targets):
                return


def _seeking_frames(container: Any, stream: Any, wanted: list[int], fps: float) -> Iterator[tuple[int, av.VideoFrame]]:
    """Seek near each wanted ordinal (sorted, unique) and decode forward to it; ordinals come from timestamps."""
    tb, t0 = float(stream.time_base), stream.start_time or 0

    def ordinal(frame: av.VideoFrame) -> int:
        return round((frame.pts - t0) * tb * fps)

    for target in wanted:
        container.seek(t0 + int(target / fps / tb), stream=stream, backward=True, any_frame=False)
        frames = container.decode(stream)
        frame = next(frames, None)
        if frame is not None and ordinal(frame) > target:  # landed past the target: start over
            container.seek(t0, stream=stream, backward=True)
            frames = container.decode(stream)
            frame = next(frames, None)
        while frame is not None and ordinal(frame) < target:
            frame = next(frames, None)
        if frame is None:
            raise EOFError(f"frame {target} is past the end of the stream")
        yield target, frame


def decode_frames(source: Any, index: int, config: VideoConfig) -> list[np.ndarray]:
    """Decode the kept frames of one video: ``clips * frames_per_clip`` RGB uint8 arrays ``[H, W, 3]``."""
    name = source_name(source, index)
    with open_source(source, index) as f:
        start = f.tell()
        kind = sniff_kind(f.read(16))
        f.seek(start)
        try:
            with av.open(f, mode="r") as container:
                stream, num_frames, fps = _stream_info(container, name)
                if num_frames == 1 and kind and kind.endswith(" image"):  # FFmpeg reads images as 1-frame videos
                    raise MediaError(name, f"this looks like {kind}, not a video; load it as an image (--image)")
                per_clip = frame_indices(num_frames, fps, config)
                wanted = sorted({i for clip in per_clip for i in clip})
                if num_frames > config.seek_min_frames:
                    frames = _seeking_frames(container, stream, wanted, fps)
                else:
                    frames = _sequential_frames(container, stream, wanted)
                decoded = {i: frame.to_ndarray(format="rgb24") for i, frame in frames}
        except MediaError:
            raise
        except (av.error.FFmpegError, ValueError, EOFError, StopIteration) as e:
            problem = f"cannot decode video ({e}); is the file complete and in a format FFmpeg reads (mp4, webm, ...)?"
            raise MediaError(name, problem) from None
    missing = [i for i in wanted if i not in decoded]
    if missing:
        raise MediaError(name, f"frames {missing} of {num_frames} could not be decoded (truncated or corrupt file?)")
    return [decoded[i] for clip in per_clip for i in clip]


def short_side_scale(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (no antialias) of ``[C, T, H, W]`` so the short side is ``size``."""
    _, _, h, w = clip.shape
    new_h, new_w = (size, math.floor(w / h * size)) if w >= h else (math.floor(h / w * size), size)
    return torch.nn.functional.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)


def spatial_crops(clip: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """``num_crops`` (1 or 3) square crops of ``[C, T, H, W]`` along the long side, offsets rounded up."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    h, w = clip.shape[-2:]
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    positions = [(y, x)]
    if num_crops == 3:
        positions = [(0, x), (y, x), (h - size, x)] if h > w else [(y, 0), (y, x), (y, w - size)]
    return [clip[..., top : top + size, left : left + size] for top, left in positions]


def transform_clip(frames: list[np.ndarray], config: VideoConfig) -> list[torch.Tensor]:
    """RGB frames of one clip -> ``num_crops`` tensors ``[3, T, size, size]``."""
    clip = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255.0
    clip = short_side_scale(clip, config.size)
    mean = torch.tensor(config.mean).view(-1, 1, 1, 1)
    std = torch.tensor(config.std).view(-1, 1, 1, 1)
    return spatial_crops((clip - mean) / std, config.size, config.num_crops)


def load_video(sources: Any, config: VideoConfig = VideoConfig()) -> torch.Tensor:
    """Load and preprocess videos exactly as ImageBind's video loader.

    Args:
        sources: one or a list of paths, bytes or binary file objects (any container/codec FFmpeg
            decodes, any orientation and frame rate).
        config: preprocessing parameters.

    Returns:
        ``[N, clips * crops = 15, 3, frames_per_clip = 2, 224, 224]`` float32.
    """
    out = []
    for i, source in enumerate(as_list(sources)):
        frames = decode_frames(source, i, config)
        k = config.frames_per_clip
        views = [v for c in range(config.clips_per_video) for v in transform_clip(frames[c * k : (c + 1) * k], config)]
        out.append(torch.stack(views))
    return torch.stack(out)
