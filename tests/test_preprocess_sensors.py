"""Depth, thermal and IMU loaders: documented conventions checked with hand-computed values."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_llm.preprocess import DepthConfig, MediaError, depth_to_disparity, load_depth, load_imu, load_thermal


def _png16(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def test_depth_png_millimetres_to_disparity(tmp_path):
    depth_mm = np.full((240, 320), 2000, dtype=np.uint16)  # 2 m everywhere
    path = tmp_path / "depth.png"
    path.write_bytes(_png16(depth_mm))
    out = load_depth([path, path.read_bytes(), depth_mm.astype(np.float32) / 1000.0])  # metres as float
    assert out.shape == (3, 1, 224, 224)
    torch.testing.assert_close(out, torch.full_like(out, 0.075 * 518.8579 / 2.0), atol=1e-5, rtol=0)


def test_depth_conversion_clips_and_disparity_passthrough(tmp_path):
    depth = np.array([[0.0, 1.0], [100.0, 4.0]])
    disparity = depth_to_disparity(depth, DepthConfig(focal_length=100.0, baseline=0.1))
    np.testing.assert_allclose(disparity, [[10.0 / 0.01, 10.0], [10.0 / 50.0, 2.5]], rtol=1e-6)
    ramp = np.tile(np.arange(224, dtype=np.float32), (224, 1))
    np.save(tmp_path / "disp.npy", ramp)
    out = load_depth(tmp_path / "disp.npy", DepthConfig(kind="disparity"))
    torch.testing.assert_close(out[0, 0], torch.from_numpy(ramp), atol=0, rtol=0)  # 224x224: no resize


def test_depth_resize_keeps_aspect_and_crops_centre():
    depth = np.ones((448, 672), np.float32)
    depth[:, :100] = 0.5  # left strip: after halving it ends at column 50, left of the crop at 56
    out = load_depth(depth, DepthConfig(kind="disparity"))
    assert out.shape == (1, 1, 224, 224)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_thermal_grayscale_and_16bit():
    gray = np.tile(np.arange(256, dtype=np.uint8)[None, 16:240], (224, 1))
    out = load_thermal([Image.fromarray(gray), Image.fromarray(np.stack([gray] * 3, -1))])
    assert out.shape == (2, 1, 224, 224)
    torch.testing.assert_close(out[0, 0], torch.from_numpy(gray).float() / 255.0)
    torch.testing.assert_close(out[1], out[0])
    wide = np.tile(np.linspace(1000, 5000, 224), (224, 1))
    scaled = load_thermal(_png16(wide))[0, 0]
    assert scaled.min() == 0.0 and scaled.max() == 1.0  # 16-bit input min-max scaled


def test_imu_layouts_and_resampling(tmp_path):
    t = np.linspace(0.0, 1.0, 500)
    series = np.stack([t * (k + 1) for k in range(6)], axis=1)  # [T, 6] linear ramps
    np.save(tmp_path / "imu.npy", series)
    csv = "timestamp,ax,ay,az,gx,gy,gz\n" + "\n".join(f"{ts}," + ",".join(map(str, row)) for ts, row in zip(t, series))
    (tmp_path / "imu.csv").write_text(csv)
    out = load_imu([tmp_path / "imu.npy", series.T, tmp_path / "imu.csv", torch.from_numpy(series)])
    assert out.shape == (4, 6, 2000)
    expected = torch.stack([torch.linspace(0, k + 1, 2000) for k in range(6)])
    for row in out:
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "loader, content, expected",
    [
        (load_imu, np.zeros((100, 5)), r"\[T, 6\]"),
        (load_imu, np.zeros((1, 6)), "time step"),
        (load_imu, np.full((10, 6), np.nan), "NaN"),
        (load_depth, np.zeros((4, 4, 3)), "single-channel"),
        (load_depth, np.full((4, 4), np.inf), "NaN or infinite"),
    ],
)
def test_bad_sensor_arrays_raise(tmp_path, loader, content, expected):
    path = tmp_path / "data.npy"
    np.save(path, content)
    with pytest.raises(MediaError, match=expected) as info:
        loader(path)
    assert str(path) in str(info.value)


def test_bad_sensor_files_raise(tmp_path):
    (tmp_path / "imu.csv").write_text("a,b\nx,y\n")
    with pytest.raises(MediaError, match="imu.csv"):
        load_imu(tmp_path / "imu.csv")
    with pytest.raises(MediaError, match="not found"):
        load_thermal(tmp_path / "missing.png")
    with pytest.raises(MediaError, match=r"<bytes #0>"):
        load_depth(b"not a png")
