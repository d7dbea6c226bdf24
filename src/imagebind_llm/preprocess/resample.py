"""Band-limited resampling with a Hann-windowed sinc (the ``torchaudio.functional.resample`` defaults).

Rates are reduced by their gcd to ``orig`` input samples -> ``new`` output samples per block. Output
sample ``k * new + r`` is the dot product of a ``[2 * width + orig]`` filter (phase ``r``) with the input
from ``k * orig - width``; zeros are assumed outside the signal. Cut-off ``rolloff * min(rates) / 2``,
``lowpass_filter_width`` zero crossings, output length ``ceil(len * new / orig)``.

`resample_range` computes any slice of the output from only the input samples it needs, so a few
seconds can be taken from an hour-long file without resampling all of it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch


@functools.lru_cache(maxsize=16)
def sinc_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """Polyphase filters for gcd-reduced rates.

    Returns:
        ``([new, 1, 2 * width + orig] float32 kernel, width)``.
    """
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float32) / orig
    phases = -torch.arange(new, dtype=torch.float32)[:, None] / new
    t = ((phases + taps[None, :]) * cutoff).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (cutoff / orig)).unsqueeze(1), width


def reduced_rates(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """``(orig, new)`` divided by their gcd."""
    g = math.gcd(int(orig_rate), int(new_rate))
    return int(orig_rate) // g, int(new_rate) // g


def resampled_length(num_samples: int, orig_rate: int, new_rate: int) -> int:
    """Number of output samples for ``num_samples`` inputs: ``ceil(num_samples * new / orig)``."""
    orig, new = reduced_rates(orig_rate, new_rate)
    return -(-num_samples * new // orig)


def input_window(start: int, stop: int, num_samples: int, orig_rate: int, new_rate: int) -> tuple[int, int]:
    """The input samples ``[a, b)`` that output samples ``[start, stop)`` depend on (clamped to the signal)."""
    if orig_rate == new_rate:
        return start, stop
    orig, new = reduced_rates(orig_rate, new_rate)
    _, width = sinc_kernel(orig, new)
    lo, hi = (start // new) * orig - width, -(-stop // new) * orig + width
    return min(max(lo, 0), num_samples), min(max(hi, 0), num_samples)


def resample_range(
    read: Callable[[int, int], torch.Tensor], num_samples: int, orig_rate: int, new_rate: int, start: int, stop: int
) -> torch.Tensor:
    """Output samples ``[start, stop)`` of resampling a ``num_samples``-long signal.

    Args:
        read: ``read(a, b)`` returns input samples ``[C, b - a]``; it is called once, with the window
            `input_window` gives.
        start, stop: output sample range, ``0 <= start <= stop <= resampled_length(...)``.

    Returns:
        ``[C, stop - start]`` float32.
    """
    if orig_rate == new_rate:
        return read(start, stop).to(torch.float32)
    orig, new = reduced_rates(orig_rate, new_rate)
    kernel, width = sinc_kernel(orig, new)
    first_block = start // new
    lo, hi = first_block * orig - width, -(-stop // new) * orig + width
    a, b = input_window(start, stop, num_samples, orig_rate, new_rate)
    chunk = torch.nn.functional.pad(read(a, b).to(torch.float32), (a - lo, hi - b))  # zeros outside the signal
    out = torch.nn.functional.conv1d(chunk[:, None], kernel, stride=orig)  # [C, new, blocks]
    out = out.transpose(1, 2).reshape(chunk.shape[0], -1)
    offset = start - first_block * new
    return out[:, offset : offset + stop - start]


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample a whole ``[C, T]`` waveform -> ``[C, ceil(T * new / orig)]``."""
    n = waveform.shape[-1]
    stop = resampled_length(n, orig_rate, new_rate)
    return resample_range(lambda a, b: waveform[:, a:b], n, orig_rate, new_rate, 0, stop)
