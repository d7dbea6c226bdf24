"""Audio preprocessing vs the official loader's outputs; resampler, odd inputs and errors."""

import io
import math
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from imagebind_llm.preprocess import AudioConfig, MediaError, load_audio
from imagebind_llm.preprocess.audio import clip_times
from imagebind_llm.preprocess.fbank import kaldi_fbank
from imagebind_llm.preprocess.resample import resample, resample_range, resampled_length

FIXTURES = Path(__file__).parent / "fixtures"
MEDIA = FIXTURES / "media"
PAD_VALUE = (0.0 + 4.268) / 9.138  # a zero-padded log-mel frame after normalisation


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "imagebind" / "preprocess_public.pt", weights_only=True)


def _tone(rate: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, (len(t), channels))
    return (0.3 * np.sin(2 * np.pi * 440 * t)[:, None] + noise).astype(np.float32)


def test_audio_matches_official(reference):
    """Covers mono/stereo, 44.1 and 22.05 kHz, a 2.6 s file with overlapping clips and a 17 s file."""
    out = load_audio([MEDIA / f for f in reference["files"]["audio"]])
    assert out.shape == (4, 3, 1, 128, 204) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference["audio"], atol=2e-3, rtol=0)


def test_input_kinds_agree(reference):
    path = MEDIA / "dog_audio.wav"
    data = path.read_bytes()
    out = load_audio([data, io.BytesIO(data), open(path, "rb"), str(path)])
    for row in out:
        torch.testing.assert_close(row, reference["audio"][0], atol=2e-3, rtol=0)


def test_clip_times_follow_fixed_sampler():
    assert clip_times(5.0, 2, 3) == [(0, 2), (1.5, 3.5), (3, 5)]
    assert clip_times(1.0, 2, 3) == [(0, 2)] * 3  # shorter than a clip: three identical clips


def test_resample_range_equals_full_resample():
    x = torch.from_numpy(_tone(44100, 0.5, channels=2).T.copy())
    full = resample(x, 44100, 16000)
    assert full.shape == (2, resampled_length(x.shape[1], 44100, 16000)) == (2, 8000)
    for a, b in [(0, 8000), (0, 1), (17, 2000), (7990, 8000), (3000, 3160)]:
        part = resample_range(lambda i, j: x[:, i:j], x.shape[1], 44100, 16000, a, b)
        torch.testing.assert_close(part, full[:, a:b], atol=1e-6, rtol=0)


@pytest.mark.parametrize("orig, new", [(44100, 16000), (22050, 16000), (8000, 16000), (48000, 16000)])
def test_resample_preserves_a_tone(orig, new):
    """A 1 kHz sine resampled is the same sine at the new rate (away from the edges)."""
    x = torch.sin(2 * math.pi * 1000 * torch.arange(orig) / orig)[None]
    y = resample(x, orig, new)[0]
    expected = torch.sin(2 * math.pi * 1000 * torch.arange(y.numel()) / new)
    torch.testing.assert_close(y[200:-200], expected[200:-200], atol=2e-3, rtol=0)


def test_short_audio_is_padded(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _tone(16000, 0.5), 16000)
    out = load_audio(path)
    assert out.shape == (1, 3, 1, 128, 204)
    valid = 1 + (8000 - 400) // 160  # fbank frames of 0.5 s at 16 kHz
    torch.testing.assert_close(out[..., valid:], torch.full_like(out[..., valid:], PAD_VALUE))
    assert (out[..., :valid] != PAD_VALUE).any()
    # identical clips, up to rounding: they share samples, and the official in-place mean removal leaves the
    # later clip shifted by the earlier one's float-rounded mean (a 1e-5 change of some log-mel values here)
    torch.testing.assert_close(out[0, 0], out[0, 2], atol=1e-4, rtol=1e-4)


def test_multichannel_copies_equal_mono(tmp_path):
    """Copies of one signal on 4 channels: mean over channels = the mono mean, fbank of channel 0."""
    mono = _tone(22050, 3.0)
    sf.write(tmp_path / "mono.wav", mono, 22050)
    sf.write(tmp_path / "quad.wav", np.repeat(mono, 4, axis=1), 22050)
    out = load_audio([tmp_path / "mono.wav", tmp_path / "quad.wav"])
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)


def _write_audio_container(path: Path, codec: str, signal: np.ndarray, rate: int) -> None:
    """Encode a mono float signal ``[T, 1]`` into a container with PyAV (no video stream)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        fmt = stream.codec_context.format.name
        for i in range(0, len(signal), 1024):
            chunk = signal[i : i + 1024, 0][None]
            if fmt.startswith("s16"):
                chunk = np.round(chunk * 32768).clip(-32768, 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_container_audio_tracks(tmp_path):
    signal = np.round(_tone(16000, 3.0) * 32768).astype(np.int16) / np.float32(32768)
    sf.write(tmp_path / "ref.wav", (signal * 32768).astype(np.int16), 16000)
    _write_audio_container(tmp_path / "lossless.mkv", "pcm_s16le", signal, 16000)
    _write_audio_container(tmp_path / "speech.mp4", "aac", signal, 16000)
    aac_bytes = (tmp_path / "speech.mp4").read_bytes()
    ref, lossless, aac = load_audio([tmp_path / "ref.wav", tmp_path / "lossless.mkv", aac_bytes])
    torch.testing.assert_close(lossless, ref, atol=1e-5, rtol=0)  # same samples via PyAV as via soundfile
    assert aac.shape == (3, 1, 128, 204)
    assert torch.corrcoef(torch.stack([aac.flatten(), ref.flatten()]))[0, 1] > 0.9  # lossy but the same sound


@pytest.mark.parametrize(
    "fmt, subtype, suffix", [("FLAC", "PCM_24", ".flac"), ("OGG", "VORBIS", ".ogg"), ("MP3", "MPEG_LAYER_III", ".mp3")]
)
def test_compressed_formats_via_soundfile(tmp_path, fmt, subtype, suffix):
    signal = _tone(44100, 3.0, channels=2)
    sf.write(tmp_path / "ref.wav", signal, 44100, subtype="FLOAT")
    sf.write(tmp_path / f"clip{suffix}", signal, 44100, format=fmt, subtype=subtype)
    path = tmp_path / f"clip{suffix}"
    ref, by_path, by_bytes = load_audio([tmp_path / "ref.wav", path, path.read_bytes()])
    torch.testing.assert_close(by_bytes, by_path, atol=0, rtol=0)  # format sniffed from the content
    if fmt == "FLAC":
        torch.testing.assert_close(by_path, ref, atol=1e-4, rtol=0)  # lossless up to 24-bit quantisation
    else:
        assert torch.corrcoef(torch.stack([by_path.flatten(), ref.flatten()]))[0, 1] > 0.9


def test_windowed_decoding_equals_whole_file(tmp_path):
    """Clips far apart are decoded and resampled window by window; the result equals doing it on the whole file."""
    signal = _tone(44100, 40.0, channels=2)
    path = tmp_path / "long.wav"
    sf.write(path, signal, 44100, subtype="FLOAT")
    out = load_audio(path)[0]
    config = AudioConfig()
    whole = resample(torch.from_numpy(signal.T.copy()), 44100, 16000)
    for k, (start, end) in enumerate(clip_times(whole.shape[1] / 16000, 2, 3)):
        clip = whole[:, int(start * 16000) : int(end * 16000)]
        mel = kaldi_fbank(clip[0] - clip.mean()).T
        expected = (torch.nn.functional.pad(mel, (0, 204 - mel.shape[1])) - config.mean) / config.std
        torch.testing.assert_close(out[k, 0], expected, atol=1e-4, rtol=0)


def test_hour_long_audio_decodes_only_the_clips(tmp_path):
    rate, seconds = 8000, 3600
    path = tmp_path / "hour.wav"
    block = _tone(rate, 60.0)
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="FLOAT") as f:
        for minute in range(seconds // 60):
            f.write(block * (1 + minute / 60))  # a different level every minute
    start = time.perf_counter()
    out = load_audio(path)[0]
    elapsed = time.perf_counter() - start
    assert out.shape == (3, 1, 128, 204)
    assert elapsed < 20  # decoding and resampling all 28.8 M samples would take far longer
    # Each clip equals resampling just a small window around it (margin >> the 7-tap filter reach).
    config, margin = AudioConfig(), 400
    for k, (t0, t1) in enumerate(clip_times(seconds, 2, 3)):
        a, b = int(t0 * 16000), int(t1 * 16000)
        lo = max(a // 2 - margin, 0)
        window, _ = sf.read(path, start=lo, frames=(b // 2 + margin) - lo, dtype="float32", always_2d=True)
        piece = resample(torch.from_numpy(window.T.copy()), rate, 16000)[:, a - 2 * lo : b - 2 * lo]
        mel = kaldi_fbank(piece[0] - piece.mean()).T
        expected = (torch.nn.functional.pad(mel, (0, 204 - mel.shape[1])) - config.mean) / config.std
        torch.testing.assert_close(out[k, 0], expected, atol=1e-4, rtol=0)


def _video_only_mp4(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


CASES = ["missing", "empty", "zero_length", "truncated", "header_only", "garbage", "no_audio_stream"]


@pytest.mark.parametrize("case", CASES)
def test_bad_audio_raises_media_error(tmp_path, case):
    suffix = {"no_audio_stream": ".mp4", "garbage": ".mp3", "truncated": ".flac"}.get(case, ".wav")
    path = tmp_path / f"{case}{suffix}"
    expected = {"missing": "not found", "empty": "empty", "zero_length": "zero length", "truncated": "truncated",
                "header_only": "cannot decode", "garbage": "cannot decode", "no_audio_stream": "no audio stream"}[case]
    if case == "empty":
        path.write_bytes(b"")
    elif case == "zero_length":
        sf.write(path, np.zeros((0, 1), np.float32), 16000)
    elif case == "truncated":  # a cut FLAC fails when decoding the last clip
        sf.write(path, _tone(16000, 8.0), 16000)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif case == "header_only":
        sf.write(path, _tone(16000, 1.0), 16000)
        path.write_bytes(path.read_bytes()[:30])
    elif case == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif case == "no_audio_stream":
        _video_only_mp4(path)
    with pytest.raises(MediaError, match=expected) as info:
        load_audio([MEDIA / "car_audio.wav", path])
    assert str(path) in str(info.value)


def test_bad_bytes_named_by_position():
    with pytest.raises(MediaError, match=r"<bytes #0>"):
        load_audio(b"RIFF\x00\x00not really a wave file")
