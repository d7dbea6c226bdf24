"""Video preprocessing vs the official loader's output; orientation, seeking, input kinds and errors."""

import io
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from imagebind_llm.preprocess import MediaError, VideoConfig, load_video
from imagebind_llm.preprocess.video import frame_indices

FIXTURES = Path(__file__).parent / "fixtures"
MEDIA = FIXTURES / "media"
VIDEO = MEDIA / "synthetic_landscape.mp4"


@pytest.fixture(scope="module")
def reference():
    ref = torch.load(FIXTURES / "imagebind" / "preprocess_public_video.pt", weights_only=True)
    assert ref["files"]["video"] == [VIDEO.name]
    return ref["video"]


@pytest.fixture(scope="module")
def ours():
    return load_video(VIDEO)


def test_video_matches_official(reference, ours):
    assert ours.shape == (1, 15, 3, 2, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=0)


def test_bytes_and_seeking_agree(reference):
    """Bytes input with the seek-per-frame decoder gives the same frames as sequential decoding."""
    out = load_video(io.BytesIO(VIDEO.read_bytes()), VideoConfig(seek_min_frames=0))
    torch.testing.assert_close(out, reference, atol=1e-3, rtol=0)


def test_seeking_across_key_frames_agrees(tmp_path):
    """h264 with B-frames and a key frame every second: per-frame seeking finds the same frames."""
    path = tmp_path / "long.mp4"
    _write_video(path, width=64, height=48, fps=25, frames=25 * 30, gop=25)
    sequential = load_video(path, VideoConfig(seek_min_frames=10**9))
    seeking = load_video(path, VideoConfig(seek_min_frames=0))
    torch.testing.assert_close(seeking, sequential, atol=0, rtol=0)


def test_frame_choice_follows_sampler():
    # 156 frames at 24 fps (6.5 s): clip k starts at 1.125 k s; frames ceil(24 t0) .. ceil(24 t1) - 1.
    assert frame_indices(156, 24.0, VideoConfig()) == [[0, 47], [27, 74], [54, 101], [81, 128], [108, 155]]
    assert frame_indices(10, 10.0, VideoConfig()) == [[0, 9]] * 5  # 1 s video: every clip is the whole video
    # 16 s at 0.25 fps: clips start at 0, 3.5, 7, 10.5, 14 s; the last would start past the end frame
    assert frame_indices(4, 0.25, VideoConfig()) == [[0, 0], [1, 1], [2, 2], [3, 3], [3, 3]]


def _write_video(path: Path, width: int, height: int, fps: int, frames: int, gop: int = 12) -> None:
    """An h264 video whose brightness grows downwards and to the right (so crops are distinguishable)
    and changes from frame to frame (so a wrong frame is visible)."""
    ramp = (np.add.outer(np.linspace(0, 150, height), np.linspace(0, 100, width))).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = width, height, "yuv420p", gop
        for i in range(frames):
            rgb = np.repeat((ramp + i % 97)[:, :, None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_portrait_video_crops_top_centre_bottom(tmp_path):
    path = tmp_path / "portrait.mp4"
    _write_video(path, width=120, height=200, fps=15, frames=45)
    out = load_video(path)
    assert out.shape == (1, 15, 3, 2, 224, 224)
    means = out[0, :3].mean(dim=(1, 2, 3, 4))  # first clip: top, centre, bottom
    assert means[0] < means[1] < means[2]


def test_landscape_video_crops_left_centre_right(tmp_path):
    path = tmp_path / "wide.mp4"
    _write_video(path, width=200, height=96, fps=30, frames=20)  # shorter than one clip
    out = load_video(str(path))
    assert out.shape == (1, 15, 3, 2, 224, 224)
    means = out[0, :3].mean(dim=(1, 2, 3, 4))
    assert means[0] < means[1] < means[2]


def test_audio_only_file_raises(tmp_path):
    path = tmp_path / "sound.wav"
    sf.write(path, np.zeros((16000, 1), np.float32), 16000)
    with pytest.raises(MediaError, match="no video stream") as info:
        load_video([VIDEO, path])
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, expected", [(b"", "empty"), (b"\x00\x00\x00\x18ftypmp42" + bytes(64), "cannot decode")])
def test_bad_video_raises(tmp_path, content, expected):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=expected):
        load_video(path)
    with pytest.raises(MediaError, match="not found"):
        load_video(tmp_path / "missing.mp4")


def test_truncated_video_raises(tmp_path):
    data = VIDEO.read_bytes()
    with pytest.raises(MediaError, match=r"<bytes #0>"):
        load_video(data[: len(data) // 2])
