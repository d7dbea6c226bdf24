"""Spoken captions through espeak-ng (Debian's ``espeak-ng`` package), as 16 kHz mono 16-bit WAV.

espeak-ng writes 22.05 kHz; the clip is resampled to the 16 kHz that `imagebind_llm.preprocess.audio` works at
(FFT resampling of the whole clip: exact band-limiting, and speech starts and ends in silence, so the circular
wrap it assumes costs nothing).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from .scene import WorldError

SAMPLE_RATE = 16000
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb+f2", "en-us+m5")
SPEEDS = (130, 150, 170, 190)  # words per minute
ESPEAK = "espeak-ng"


def espeak_missing() -> str:
    """Why speech cannot be made here (``""`` when espeak-ng is installed)."""
    if shutil.which(ESPEAK) is None:
        return f"{ESPEAK} is not installed (Debian: apt-get install espeak-ng)"
    return ""


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """``[n]`` at ``rate`` -> ``[n * new_rate // rate]`` at ``new_rate`` by truncating or padding the spectrum."""
    n_out = len(samples) * new_rate // rate
    spectrum = np.fft.rfft(samples)[: n_out // 2 + 1]
    return np.fft.irfft(spectrum, n_out) * (n_out / len(samples))


def speak(text: str, voice: str = VOICES[0], speed: int = SPEEDS[1]) -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 samples ``[n]`` in [-1, 1] at 16 kHz.

    Raises:
        WorldError: espeak-ng is missing, or refuses the voice.
    """
    missing = espeak_missing()
    if missing:
        raise WorldError(f"{missing}; generate without audio (--no-audio)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        run = subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-w", str(path), "--", text],
                             capture_output=True, text=True)
        if run.returncode != 0 or not path.is_file():
            raise WorldError(f"{ESPEAK} -v {voice} failed: {run.stderr.strip() or f'exit code {run.returncode}'}")
        with wave.open(str(path), "rb") as f:
            rate, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
            data = f.readframes(f.getnframes())
    if width != 2 or channels != 1:
        raise WorldError(f"{ESPEAK} wrote {channels} channel(s) of {8 * width}-bit audio; expected 16-bit mono")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768
    return np.clip(resample(samples, rate, SAMPLE_RATE), -1, 1).astype(np.float32)


def write_wav(path: str | Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write float samples ``[n]`` in [-1, 1] as 16-bit mono PCM WAV."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
