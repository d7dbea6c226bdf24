"""Audio preprocessing as ImageBind's ``load_and_transform_audio_data``.

Per file: decode (all channels, float in [-1, 1]) -> resample to 16 kHz (`resample`) -> three evenly
spaced 2 s clips (`clip_times`, the git version of pytorchvideo's ``ConstantClipsPerVideoSampler``:
step ``(d - 2) / (clips - 1)`` on exact fractions, sample ``int(t * 16000)``) -> per clip, in order:
subtract the clip's mean over all channels *in place* on the shared waveform (so overlapping later
clips see the shifted samples, as upstream does), Kaldi fbank of channel 0 (stereo is not downmixed),
transpose, right-pad with zeros or cut to 204 frames, then ``(x - mean) / std``.

Only the samples the clips need are decoded and resampled, so hour-long files cost the same as short
ones (soundfile seeks; PyAV streams through the file once to count samples and once to collect them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
import soundfile as sf
import torch

from .errors import MediaError, as_list, open_source, source_name, source_suffix
from .fbank import FRAME_LENGTH_MS, kaldi_fbank
from .resample import input_window, resample_range, resampled_length

log = logging.getLogger(__name__)

# Formats libsndfile decodes; anything else (mp4, m4a, aac, webm, ...) goes through PyAV.
_SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus"}


@dataclass
class AudioConfig:
    """Audio preprocessing parameters (defaults = ImageBind)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_length: int = 204
    clip_duration: int = 2
    clips_per_video: int = 3
    mean: float = -4.268
    std: float = 9.138


def clip_times(duration: float, clip_duration: float, num_clips: int) -> list[tuple[Fraction, Fraction]]:
    """Start/end seconds of ``num_clips`` evenly spaced clips.

    The last clip ends at ``duration``; if ``duration <= clip_duration`` every clip is ``[0, clip_duration]``.
    """
    max_start = Fraction(max(duration - clip_duration, 0))
    step = max_start / max(num_clips - 1, 1)
    return [(step * k, step * k + Fraction(clip_duration)) for k in range(num_clips)]


class _AudioReader:
    """Random access to decoded samples: ``num_samples``, ``sample_rate``, ``read_ranges``."""

    num_samples: int
    sample_rate: int

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Samples ``[a, b)`` of each range as float32 ``[C, b - a]``."""
        raise NotImplementedError


class _SoundfileReader(_AudioReader):
    """wav/flac/ogg/mp3/... through libsndfile, seeking to each range."""

    def __init__(self, f: Any) -> None:
        self.file = sf.SoundFile(f)
        self.num_samples, self.sample_rate = self.file.frames, self.file.samplerate

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        out = []
        for a, b in ranges:
            self.file.seek(a)
            data = self.file.read(b - a, dtype="float32", always_2d=True)
            if data.shape[0] != b - a:
                raise EOFError(f"expected {b - a} samples at offset {a}, got {data.shape[0]}")
            out.append(torch.from_numpy(data.T.copy()))
        return out


class _PyAVReader(_AudioReader):
    """The first audio track of any container FFmpeg reads (mp4/m4a/aac/webm/...), as float planar.

    FFmpeg cannot seek sample-exactly in general, so the file is streamed: once to count samples, once
    to collect the requested ranges (memory stays proportional to the ranges, not the file).
    """

    def __init__(self, f: Any, name: str) -> None:
        self.file = f
        with av.open(f, mode="r") as container:
            if not container.streams.audio:
                raise MediaError(name, "has no audio stream; pass a file with an audio track")
            codec = container.streams.audio[0].codec_context
            if codec is None or not codec.sample_rate:  # a corrupt header FFmpeg could not make a decoder for
                raise MediaError(name, "its audio stream cannot be decoded (corrupt or unsupported); pass a wav, "
                                       "flac, ogg, mp3 or m4a file")
            self.sample_rate = codec.sample_rate
        self.num_samples = sum(frame.shape[1] for frame in self._frames())

    def _frames(self) -> Iterator[np.ndarray]:
        self.file.seek(0)
        with av.open(self.file, mode="r") as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=self.sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield out.to_ndarray()
            for out in resampler.resample(None):
                yield out.to_ndarray()

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        parts: list[list[np.ndarray]] = [[] for _ in ranges]
        pos = 0
        for frame in self._frames():
            end = pos + frame.shape[1]
            for part, (a, b) in zip(parts, ranges):
                if a < end and b > pos:
                    part.append(frame[:, max(a - pos, 0) : min(b, end) - pos])
            pos = end
        if any(not p for p, (a, b) in zip(parts, ranges) if b > a):
            raise EOFError("the stream ended before the requested samples")
        return [torch.from_numpy(np.concatenate(p, axis=1)) for p in parts]


def _open_reader(f: Any, suffix: str, name: str) -> _AudioReader:
    """libsndfile for its formats (by suffix, or any input without one), else (or if it fails) PyAV."""
    problems = []
    if suffix in _SOUNDFILE_SUFFIXES or not suffix:
        try:
            return _SoundfileReader(f)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            problems.append(f"libsndfile: {e}")
            f.seek(0)
    try:
        return _PyAVReader(f, name)
    except (av.error.FFmpegError, ValueError, EOFError) as e:
        problems.append(f"FFmpeg: {e}")
    raise MediaError(
        name, f"cannot decode audio ({'; '.join(problems)}); expected wav/flac/ogg/mp3 or a file with an audio track"
    )


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of half-open ranges as sorted disjoint ranges (touching ranges stay separate)."""
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _read_resampled(reader: _AudioReader, ranges: list[tuple[int, int]], rate: int) -> list[torch.Tensor]:
    """Samples ``[a, b)`` of the ``rate``-Hz version of the signal, for each range, reading only what they need."""
    n, orig = reader.num_samples, reader.sample_rate
    windows = [input_window(a, b, n, orig, rate) for a, b in ranges]
    inputs = reader.read_ranges(windows)
    return [resample_range(lambda *_: x, n, orig, rate, a, b) for x, (a, b) in zip(inputs, ranges)]


def _clip_features(clip: torch.Tensor, config: AudioConfig) -> torch.Tensor:
    """In-place mean removal, fbank of channel 0, pad/cut and normalise: ``[C, T]`` -> ``[1, mel, target]``."""
    clip -= clip.mean()
    mel = kaldi_fbank(clip[0], config.sample_rate, config.num_mel_bins).T  # [mel, frames]
    frames = mel.shape[1]
    if abs(config.target_length - frames) > 0.2 * max(frames, 1):
        log.debug("audio clip has %d fbank frames, padding/cutting to %d", frames, config.target_length)
    if frames < config.target_length:
        mel = torch.nn.functional.pad(mel, (0, config.target_length - frames))
    mel = mel[:, : config.target_length]
    return ((mel - config.mean) / config.std).unsqueeze(0)


def _decode_clips(source: Any, index: int, config: AudioConfig) -> torch.Tensor:
    """One file -> ``[clips, 1, mel, target_length]``."""
    name = source_name(source, index)
    with open_source(source, index) as f:
        reader = _open_reader(f, source_suffix(source), name)
        if reader.num_samples == 0 or reader.sample_rate <= 0:
            raise MediaError(name, "audio has no samples (zero length)")
        n = resampled_length(reader.num_samples, reader.sample_rate, config.sample_rate)
        if n < int(config.sample_rate * FRAME_LENGTH_MS / 1000):  # no fbank frame: upstream fails too
            raise MediaError(name, f"audio is too short ({n / config.sample_rate * 1000:.1f} ms); the minimum is "
                                   f"{FRAME_LENGTH_MS:g} ms (one filterbank frame)")
        times = clip_times(n / config.sample_rate, config.clip_duration, config.clips_per_video)
        clips = [(int(s * config.sample_rate), min(int(e * config.sample_rate), n)) for s, e in times]
        segments = _merge_ranges(clips)
        try:
            buffers = _read_resampled(reader, segments, config.sample_rate)
        except (sf.LibsndfileError, RuntimeError, EOFError, av.error.FFmpegError) as e:
            raise MediaError(name, f"cannot decode audio ({e}); the file may be truncated") from None
    out = []
    for a, b in clips:  # sequentially: the in-place mean shift must carry over to overlapping clips
        seg = next(i for i, (sa, sb) in enumerate(segments) if sa <= a and b <= sb)
        offset = segments[seg][0]
        out.append(_clip_features(buffers[seg][:, a - offset : b - offset], config))
    return torch.stack(out)


def load_audio(sources: Any, config: AudioConfig = AudioConfig()) -> torch.Tensor:
    """Load and preprocess audio files exactly as ImageBind's audio loader.

    Args:
        sources: one or a list of paths, bytes or binary file objects (wav/flac/ogg/mp3 via soundfile;
            mp4/m4a/aac/webm/... audio tracks via PyAV), any sample rate and channel count.
        config: preprocessing parameters.

    Returns:
        ``[N, clips=3, 1, 128, 204]`` float32.
    """
    return torch.stack([_decode_clips(s, i, config) for i, s in enumerate(as_list(sources))])
