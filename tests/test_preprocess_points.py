"""Point-cloud loading: every format round-trips, normalisation and resampling, errors."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from imagebind_llm.preprocess import MediaError, load_points
from imagebind_llm.preprocess.points import farthest_point_sample

MEDIA = Path(__file__).parent / "fixtures" / "media"
EXAMPLES = ["airplane", "car", "door", "toilet"]
PCD_HEADER = "VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {n}\nHEIGHT 1\nPOINTS {n}\n"


@pytest.fixture(scope="module")
def cloud() -> np.ndarray:
    """A raw (unnormalised) cloud of 700 points in float32-representable values."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(700, 3)) * [3.0, 1.0, 0.5] + [10.0, -2.0, 4.0]).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("name", EXAMPLES)
def test_bundled_examples_are_already_normalised(name):
    raw = torch.load(MEDIA / f"{name}.pt", weights_only=True)
    out = load_points(MEDIA / f"{name}.pt")
    assert out.shape == (1, 8192, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], raw, atol=1e-6, rtol=0)  # normalising again is a no-op
    torch.testing.assert_close(load_points(raw, normalize=False)[0], raw, atol=0, rtol=0)


def test_normalisation_matches_pc_normalize(cloud):
    out = load_points(cloud, n_points=700)[0].double()
    centred = cloud - cloud.mean(axis=0)
    expected = centred / np.linalg.norm(centred, axis=1).max()
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def _writers(cloud: np.ndarray):
    def npy(p):
        np.save(p, cloud)

    def pt(p):
        torch.save(torch.from_numpy(cloud.astype(np.float32)), p)

    def ply(p, text):
        vertex = np.array([tuple(r) for r in cloud], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
        PlyData([PlyElement.describe(vertex, "vertex")], text=text).write(str(p))

    def pcd(p, binary):
        header = (f"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F U\nCOUNT 1 1 1 1\n"
                  f"WIDTH {len(cloud)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(cloud)}\n")
        rgb = np.arange(len(cloud), dtype=np.uint32)
        if binary:
            table = np.zeros(len(cloud), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")])
            table["x"], table["y"], table["z"], table["rgb"] = cloud[:, 0], cloud[:, 1], cloud[:, 2], rgb
            p.write_bytes((header + "DATA binary\n").encode() + table.tobytes())
        else:
            rows = "\n".join(f"{x:.9g} {y:.9g} {z:.9g} {c}" for (x, y, z), c in zip(cloud, rgb))
            p.write_text(header + "DATA ascii\n" + rows + "\n")

    def xyz(p):
        p.write_text("\n".join(f"{x:.9g} {y:.9g} {z:.9g} 0.1 0.2 0.3" for x, y, z in cloud))

    def pts(p):
        p.write_text(f"{len(cloud)}\n" + "\n".join(f"{x:.9g},{y:.9g},{z:.9g}" for x, y, z in cloud))

    def obj(p):
        p.write_text("# mesh\no thing\n" + "".join(f"v {x:.9g} {y:.9g} {z:.9g}\n" for x, y, z in cloud) + "vn 0 0 1\nf 1 2 3\n")

    return {
        "a.npy": npy, "a.pt": pt, "ascii.ply": lambda p: ply(p, True), "binary.ply": lambda p: ply(p, False),
        "ascii.pcd": lambda p: pcd(p, False), "binary.pcd": lambda p: pcd(p, True), "a.xyz": xyz, "a.pts": pts, "a.obj": obj,
    }


def test_every_format_round_trips(tmp_path, cloud):
    expected = load_points(cloud, n_points=700)[0]
    paths = []
    for name, write in _writers(cloud).items():
        path = tmp_path / name
        write(path)
        paths.append(path)
    out = load_points(paths, n_points=700)
    for path, row in zip(paths, out):
        torch.testing.assert_close(row, expected, atol=1e-6, rtol=0, msg=lambda m: f"{path.name}: {m}")
    # Without a file name the format is recognised from the content.
    anonymous = load_points([p.read_bytes() for p in paths] + [io.BytesIO(paths[2].read_bytes())], n_points=700)
    torch.testing.assert_close(anonymous, torch.cat([out, out[2:3]]), atol=0, rtol=0)


def test_farthest_point_sampling_by_hand():
    line = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [10, 0, 0]])
    # after 0 and 10, the distances to the chosen set are 1, 2, 3: point 3 (x=3) is next
    assert farthest_point_sample(line, 3).tolist() == [0, 4, 3]


def test_resampling_is_deterministic_and_per_cloud(cloud):
    more = load_points(cloud, n_points=256)
    assert more.shape == (1, 256, 3)
    torch.testing.assert_close(load_points([cloud, cloud[:300]], n_points=256)[0], more[0], atol=0, rtol=0)
    fewer = load_points(cloud[:100], n_points=256, normalize=False)[0]
    torch.testing.assert_close(fewer, torch.from_numpy(cloud[np.arange(256) % 100]).float(), atol=0, rtol=0)
    subset = load_points(cloud, n_points=256, normalize=False)[0].double().numpy()
    assert len(np.unique(subset, axis=0)) == 256  # FPS never repeats a point


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("nan.npy", np.array([[0.0, 1, 2], [np.nan, 0, 0]]), "NaN"),
        ("flat.npy", np.zeros((10, 2)), r"shape \[N, 3\]"),
        ("empty.xyz", "", "empty"),
        ("words.xyz", "hello world\n", r"shape \[N, 3\]"),
        ("mesh.stl", "solid x", "unknown point-cloud extension"),
        ("packed.pcd", PCD_HEADER.format(n=2) + "DATA binary_compressed\n", "not supported"),
        ("short.pcd", PCD_HEADER.format(n=9) + "DATA binary\n\x00\x00", "truncated"),
        ("same.npy", np.ones((5, 3)), "identical"),
        ("pickle.pt", {"points": 1}, "expected a tensor"),
    ],
)
def test_bad_point_files_raise(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, dict):
        torch.save(content, path)
    else:
        path.write_text(content)
    with pytest.raises(MediaError, match=expected) as info:
        load_points([MEDIA / "car.pt", path])
    assert str(path) in str(info.value)


def test_missing_file_and_bytes_naming(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_points(tmp_path / "nope.ply")
    with pytest.raises(MediaError, match=r"<bytes #1>"):
        load_points([MEDIA / "car.pt", b"ply\nformat ascii 1.0\nelement vertex 5\n"])
