"""Kaldi-compatible log mel filterbank features in plain torch (the configuration ImageBind uses).

Matches Kaldi's ``compute-fbank-feats`` semantics with: ``snip_edges`` framing, no dither, per-frame DC
removal, pre-emphasis 0.97 (first sample pre-emphasised against itself), a symmetric Hann window, FFT
size rounded up to a power of two, power spectrum, triangular filters on Kaldi's mel scale
``1127 ln(1 + f / 700)`` between ``low_freq`` and Nyquist, and ``log(max(x, float32 eps))``. No energy
term (``use_energy=False``), so ``htk_compat`` changes nothing.
"""

from __future__ import annotations

import functools
import math

import torch

_LOG_FLOOR = torch.finfo(torch.float32).eps
FRAME_LENGTH_MS = 25.0  # the analysis window: shorter signals have no frame


def mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale ``1127 * ln(1 + f / 700)``."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(num_bins: int, fft_size: int, sample_rate: float, low_freq: float = 20.0) -> torch.Tensor:
    """Triangular mel filters, evenly spaced in mel between ``low_freq`` and Nyquist.

    Returns:
        ``[num_bins, fft_size // 2 + 1]`` float32 weights (the Nyquist bin always has weight 0, as in Kaldi).
    """
    nyquist = 0.5 * sample_rate
    mel_low, mel_high = mel_scale(low_freq), mel_scale(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + delta * torch.arange(num_bins + 2, dtype=torch.float32)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fft_mel = mel_scale(sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float32))[None, :]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(weights, (0, 1))


def frame_signal(signal: torch.Tensor, frame_length: int, frame_shift: int) -> torch.Tensor:
    """Split ``[T]`` into ``[frames, frame_length]`` windows, dropping the incomplete tail (snip_edges)."""
    if signal.numel() < frame_length:
        return signal.new_zeros(0, frame_length)
    num_frames = 1 + (signal.numel() - frame_length) // frame_shift
    return signal.as_strided((num_frames, frame_length), (frame_shift * signal.stride(0), signal.stride(0)))


def kaldi_fbank(
    signal: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = FRAME_LENGTH_MS,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
) -> torch.Tensor:
    """Log mel filterbank of a mono signal (same scale as the input; no int16 rescaling).

    Args:
        signal: ``[T]`` float waveform.

    Returns:
        ``[frames, num_mel_bins]`` float32 with ``frames = 1 + (T - window) // shift`` (0 if ``T < window``).
    """
    window_size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    fft_size = 1 << (window_size - 1).bit_length()
    frames = frame_signal(signal.to(torch.float32), window_size, shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    frames = frames * torch.hann_window(window_size, periodic=False, dtype=torch.float32)
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)
    mel = power @ mel_filterbank(num_mel_bins, fft_size, float(sample_rate), low_freq).T
    return mel.clamp_min(_LOG_FLOOR).log()
